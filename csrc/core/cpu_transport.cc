// CPU transport: each rank's region is a POSIX shared-memory segment (mode 0600, a unique name).
// Peers in this process use the pointer directly; peers in other processes map the segment by
// name. seal() unlinks the name once every peer has mapped it, so a crash later leaves nothing in
// /dev/shm; names still linked when the process exits normally (an interrupted bootstrap) are
// unlinked at exit; segments of processes that died before sealing are removed at the next start.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "fused_a2a/buffer.h"
#include "fused_a2a/errors.h"

namespace fa2a {
namespace {

constexpr const char* kShmPrefix = "fa2a_";

// Removes /dev/shm/fa2a_<pid>_* segments whose creating process no longer exists.
void remove_stale_segments() {
  static std::atomic<bool> done{false};
  if (done.exchange(true)) return;
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return;
  std::vector<std::string> stale;
  while (dirent* entry = readdir(dir)) {
    std::string name = entry->d_name;
    if (name.rfind(kShmPrefix, 0) != 0) continue;
    long pid = std::strtol(name.c_str() + std::strlen(kShmPrefix), nullptr, 10);
    if (pid > 0 && kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) stale.push_back(name);
  }
  closedir(dir);
  for (const auto& name : stale) shm_unlink(("/" + name).c_str());
}

// Names this process created and has not unlinked yet; unlinked by an atexit handler.
struct LinkedNames {
  std::mutex mutex;
  std::set<std::string> names;
};

LinkedNames& linked_names() {
  static LinkedNames* instance = new LinkedNames();  // never destroyed: used at exit
  return *instance;
}

void unlink_linked_names_at_exit() {
  LinkedNames& linked = linked_names();
  std::lock_guard<std::mutex> lock(linked.mutex);
  for (const auto& name : linked.names) shm_unlink(name.c_str());
  linked.names.clear();
}

void track_linked_name(const std::string& name, bool linked) {
  static std::once_flag registered;
  std::call_once(registered, [] { std::atexit(unlink_linked_names_at_exit); });
  LinkedNames& names = linked_names();
  std::lock_guard<std::mutex> lock(names.mutex);
  if (linked) {
    names.names.insert(name);
  } else {
    names.names.erase(name);
  }
}

struct Mapping {
  void* base = nullptr;
  size_t bytes = 0;
  bool owned_by_this_process = false;  // same-process peers are not unmapped by us
};

class CpuTransport : public Transport {
 public:
  CpuTransport(int64_t group_id, int rank) : group_id_(group_id), rank_(rank) {}
  ~CpuTransport() override { release(); }

  void* allocate(size_t bytes) override {
    remove_stale_segments();
    static std::atomic<uint64_t> counter{0};
    std::ostringstream name;
    name << "/" << kShmPrefix << getpid() << "_" << std::hex << static_cast<uint64_t>(group_id_)
         << "_" << std::dec << rank_ << "_" << counter.fetch_add(1);
    name_ = name.str();
    int fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    FA2A_CHECK_RUNTIME(fd >= 0, "shm_open(", name_, ") failed: ", std::strerror(errno));
    if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      int err = errno;
      close(fd);
      shm_unlink(name_.c_str());
      FA2A_FAIL(ErrorKind::kRuntime, "ftruncate of shared memory ", name_, " to ", bytes,
                " bytes failed: ", std::strerror(err));
    }
    // Reserve the pages now: on a full /dev/shm (tmpfs) a lazily backed segment would raise
    // SIGBUS at the first write into it instead of an error here.
    if (int err = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
        err != 0 && err != EOPNOTSUPP && err != EINVAL) {
      close(fd);
      shm_unlink(name_.c_str());
      FA2A_FAIL(ErrorKind::kRuntime, "cannot reserve ", bytes, " bytes of shared memory in ",
                "/dev/shm for ", name_, ": ", std::strerror(err),
                " (free space there, enlarge it, e.g. docker --shm-size, or lower "
                "FUSED_A2A_BUFFER_ROWS)");
    }
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) {
      shm_unlink(name_.c_str());
      FA2A_FAIL(ErrorKind::kRuntime, "mmap of ", bytes,
                " bytes of shared memory failed: ", std::strerror(errno));
    }
    linked_ = true;
    track_linked_name(name_, true);
    own_ = {base, bytes, true};
    return base;
  }

  std::string export_info() override {
    std::ostringstream info;
    info << getpid() << " " << name_ << " " << reinterpret_cast<uintptr_t>(own_.base) << " "
         << own_.bytes;
    return info.str();
  }

  void* import_peer(const std::string& info) override {
    std::istringstream in(info);
    long pid = 0;
    std::string name;
    uintptr_t pointer = 0;
    size_t bytes = 0;
    in >> pid >> name >> pointer >> bytes;
    FA2A_CHECK_RUNTIME(!in.fail() && name.rfind(std::string("/") + kShmPrefix, 0) == 0,
                       "malformed fused_a2a buffer info '", info, "'");
    FA2A_CHECK_RUNTIME(bytes == own_.bytes, "peer buffer has ", bytes, " bytes, this rank has ",
                       own_.bytes, ": all ranks must create the buffer with the same size");
    if (pid == getpid()) return reinterpret_cast<void*>(pointer);
    int fd = shm_open(name.c_str(), O_RDWR, 0600);
    FA2A_CHECK_RUNTIME(fd >= 0, "shm_open of peer segment ", name,
                       " failed: ", std::strerror(errno));
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    FA2A_CHECK_RUNTIME(base != MAP_FAILED, "mmap of peer segment ", name,
                       " failed: ", std::strerror(errno));
    peers_.push_back({base, bytes, false});
    return base;
  }

  void seal() override {
    if (linked_) {
      shm_unlink(name_.c_str());
      track_linked_name(name_, false);
    }
    linked_ = false;
  }

  void release() override {
    for (auto& peer : peers_) munmap(peer.base, peer.bytes);
    peers_.clear();
    if (own_.base != nullptr) munmap(own_.base, own_.bytes);
    own_ = {};
    seal();
  }

 private:
  int64_t group_id_;
  int rank_;
  std::string name_;
  bool linked_ = false;
  Mapping own_;
  std::vector<Mapping> peers_;
};

}  // namespace

std::unique_ptr<Transport> make_cpu_transport(int64_t group_id, int rank, int /*device*/) {
  return std::make_unique<CpuTransport>(group_id, rank);
}

}  // namespace fa2a
