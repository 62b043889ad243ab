// One load: partition files -> (DRAM chunks) -> destination buffers, run by
// reader threads and copy threads joined by task queues, with CRC-32C checks
// inside the pipeline. Python plans the jobs; this does the mechanics.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "chunk_pool.h"
#include "task_queue.h"

namespace sllm {

struct FileJob {
  std::string path;
  uint64_t nbytes = 0;             // expected length of the data file (a multiple of 4096)
  uint64_t block_size = 1u << 20;  // checksum block
  std::vector<uint32_t> crcs;      // one per block; empty = do not verify
  uintptr_t dest = 0;              // destination buffer of nbytes, or 0
  std::vector<int64_t> chunks;     // pool chunks to fill in file order, or empty
};

struct LoadOptions {
  int readers = 8;
  int copiers = 2;
  size_t io_size = 16u << 20;  // request size when reading straight into `dest`
  bool direct = true;          // O_DIRECT for data not in the page cache
  bool notify = false;         // report each finished chunk through next_completed()
  bool prefault_dest = true;   // fault destination pages in ahead of the readers
};

struct LoadStats {
  uint64_t bytes_direct = 0, bytes_cached = 0, bytes_copied = 0, bytes_verified = 0;
  uint64_t ns_read = 0, ns_verify = 0, ns_copy = 0, ns_wall = 0;
  bool used_direct = false;
};

// Process-wide counters for the throughput displays.
struct GlobalCounters {
  std::atomic<uint64_t> bytes_read{0}, bytes_copied{0}, bytes_verified{0}, loads{0}, failures{0};
  std::atomic<uint64_t> ns_read{0}, ns_copy{0};  // summed over threads: busy time, not elapsed
  std::atomic<uint64_t> ns_load_wall{0};          // elapsed time of all loads (for bandwidth)
};
GlobalCounters& global_counters();

class LoadTask {
 public:
  // Validates the jobs (std::invalid_argument) and starts working at once.
  LoadTask(std::vector<FileJob> jobs, ChunkPool* pool, LoadOptions opts);
  ~LoadTask();
  LoadTask(const LoadTask&) = delete;
  LoadTask& operator=(const LoadTask&) = delete;

  void cancel();
  // Blocks until every thread has stopped; true when the load succeeded.
  bool wait();
  bool done() const { return finished_.load(); }
  // notify mode: (job, chunk) pairs as chunks finish; nullopt on timeout;
  // (-1, -1) once everything finished (or failed).
  std::optional<std::pair<int, int64_t>> next_completed(std::chrono::milliseconds timeout);

  const std::string& error_kind() const { return error_kind_; }
  const std::string& error_message() const { return error_message_; }
  LoadStats stats() const;

 private:
  struct Unit {
    int job;
    int64_t index;     // chunk or segment number within the job
    uint64_t offset;   // file offset
    uint64_t length;
    char* staging;     // where the reader writes
  };
  struct OpenFile {
    int fd_direct = -1, fd_buffered = -1;
    void* map = nullptr;  // for mincore(): which ranges are already in the page cache
  };

  void run();
  void reader();
  void copier();
  void prefaulter();
  void read_unit(const Unit& u);
  bool verify_unit(const Unit& u);
  void finish_unit(const Unit& u);
  void fail(const std::string& kind, const std::string& message);
  bool resident(const OpenFile& f, uint64_t off, uint64_t len) const;

  std::vector<FileJob> jobs_;
  ChunkPool* pool_;
  LoadOptions opts_;
  std::vector<Unit> units_;
  std::vector<OpenFile> files_;
  std::atomic<size_t> next_unit_{0};
  std::atomic<bool> cancelled_{false}, finished_{false};
  std::atomic<bool> direct_ok_{true};
  bool copy_stage_ = false;
  TaskQueue<size_t> copy_queue_;
  TaskQueue<std::pair<int, int64_t>> completed_;
  std::mutex err_mu_;
  std::string error_kind_, error_message_;
  std::atomic<uint64_t> bytes_direct_{0}, bytes_cached_{0}, bytes_copied_{0}, bytes_verified_{0};
  std::atomic<uint64_t> ns_read_{0}, ns_verify_{0}, ns_copy_{0}, ns_wall_{0};
  std::thread runner_;
};

// Parallel memcpy, used for DRAM tier -> host "device" copies and as the
// memory-bandwidth limit in the benchmarks.
void parallel_copy(char* dst, const char* src, size_t n, int threads);
// Copies pool chunks (in order) into one contiguous destination of nbytes.
void copy_chunks(const ChunkPool& pool, const std::vector<int64_t>& chunks, size_t nbytes, char* dst,
                 int threads);

}  // namespace sllm
