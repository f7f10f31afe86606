// Errors of the core: one exception type with a kind that the bindings map to Python exceptions
// (ValueError, TypeError, RuntimeError, the package's TimeoutError) or to XLA FFI error codes.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace fa2a {

enum class ErrorKind : int {
  kValue = 0,
  kType = 1,
  kRuntime = 2,
  kTimeout = 3,
  kNotImplemented = 4
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}

}  // namespace fa2a

// FA2A_CHECK(cond, kind, "message parts", value, ...): throws fa2a::Error(kind) with the parts
// concatenated. Messages name the argument and the offending value.
#define FA2A_CHECK_KIND(cond, kind, ...)                                    \
  do {                                                                      \
    if (!(cond)) throw ::fa2a::Error((kind), ::fa2a::str_cat(__VA_ARGS__)); \
  } while (0)
#define FA2A_CHECK(cond, ...) FA2A_CHECK_KIND(cond, ::fa2a::ErrorKind::kValue, __VA_ARGS__)
#define FA2A_CHECK_TYPE(cond, ...) FA2A_CHECK_KIND(cond, ::fa2a::ErrorKind::kType, __VA_ARGS__)
#define FA2A_CHECK_RUNTIME(cond, ...) \
  FA2A_CHECK_KIND(cond, ::fa2a::ErrorKind::kRuntime, __VA_ARGS__)
#define FA2A_FAIL(kind, ...) throw ::fa2a::Error((kind), ::fa2a::str_cat(__VA_ARGS__))
