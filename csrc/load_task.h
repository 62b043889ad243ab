// One load: partition files -> (DRAM chunks) -> destination buffers, run by
// reader threads and copy threads joined by task queues, with CRC-32C checks
// inside the pipeline. Python plans the jobs; this does the mechanics.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "busy_clock.h"
#include "chunk_pool.h"
#include "task_queue.h"

namespace sllm {

struct FileJob {
  std::string path;
  uint64_t nbytes = 0;             // bytes to read from the start of the file (the file may be longer)
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
  // Test hooks (never set in production): a thread that throws ("reader", "copier",
  // "prefaulter", "runner"; with debug_throw_foreign, something not derived from
  // std::exception), and a job whose O_DIRECT reads fail with EINVAL as a
  // filesystem that refuses direct I/O would (-1: none).
  std::string debug_throw;
  bool debug_throw_foreign = false;
  int debug_refuse_direct_job = -1;
};

struct LoadStats {
  uint64_t bytes_direct = 0, bytes_cached = 0, bytes_copied = 0, bytes_verified = 0;
  uint64_t ns_read = 0, ns_verify = 0, ns_copy = 0;  // summed over threads: busy time
  uint64_t ns_wall = 0;                              // this load's elapsed time
  uint64_t files_direct_refused = 0;                 // files whose filesystem refused O_DIRECT
  bool used_direct = false;
};

// Process-wide counters for the throughput displays and the placement's
// bandwidths. Times are BusyClock unions (elapsed, concurrent loads counted once).
struct GlobalCounters {
  std::atomic<uint64_t> bytes_direct{0}, bytes_cached{0};  // read with O_DIRECT / buffered (page cache)
  std::atomic<uint64_t> bytes_copied{0}, bytes_verified{0}, loads{0}, failures{0};
  std::atomic<uint64_t> ns_load_sum{0};  // sum of each load's elapsed time (>= the union when loads overlap)
  std::atomic<uint64_t> dram_hits{0}, bytes_dram{0};  // loads served from the chunk pool, and their bytes
  std::atomic<uint64_t> bytes_h2d{0}, ns_h2d{0};  // host -> CUDA device (time: each load's copies, GPU-timed)
  BusyClock load_clock;    // any load running
  BusyClock read_clock;    // any read in flight
  BusyClock direct_clock;  // any O_DIRECT read in flight
  BusyClock cached_clock;  // any buffered read in flight
  BusyClock copy_clock;    // any host memcpy (copy stage, DRAM tier -> host device)
};
GlobalCounters& global_counters();

struct Completed {
  int job;
  int64_t index;
  int64_t chunk;
};

class LoadTask {
 public:
  // Validates the jobs (std::invalid_argument) and starts working at once.
  // With a `ring` of pool chunks (ring mode: jobs have neither chunks nor a
  // destination), each unit is read into whichever ring chunk is free, reported
  // through next_completed(), and its chunk is reused once recycle()d: a
  // bounded staging area for a consumer that copies elsewhere (e.g. to CUDA).
  LoadTask(std::vector<FileJob> jobs, ChunkPool* pool, LoadOptions opts, std::vector<int64_t> ring = {});
  ~LoadTask();
  LoadTask(const LoadTask&) = delete;
  LoadTask& operator=(const LoadTask&) = delete;

  void cancel();
  // Blocks until every thread has stopped; true when the load succeeded.
  bool wait();
  bool done() const { return finished_.load(); }
  // notify mode: (job, unit index, pool chunk or -1) as units finish; nullopt on
  // timeout; (-1, -1, -1) once everything finished (or failed).
  std::optional<Completed> next_completed(std::chrono::milliseconds timeout);
  // Ring mode: gives a staging chunk back once its contents have been consumed.
  void recycle(int64_t chunk);

  const std::string& error_kind() const { return error_kind_; }
  const std::string& error_message() const { return error_message_; }
  LoadStats stats() const;

 private:
  struct Unit {
    int job;
    int64_t index;     // chunk or segment number within the job
    uint64_t offset;   // file offset
    uint64_t length;
    char* staging;     // where the reader writes (ring mode: set when a chunk is free)
    int64_t chunk;     // the pool chunk holding `staging`, or -1
  };
  struct OpenFile {
    int fd_direct = -1, fd_buffered = -1;
    void* map = nullptr;  // for mincore(): which ranges are already in the page cache
    std::atomic<bool> direct_ok{true};  // per file: one filesystem's refusal leaves the others direct
  };

  void run();
  void run_stages();
  void reader();
  void read_units();
  void copier();
  void copy_units();
  void prefaulter();
  void prefault_units();
  void read_unit(const Unit& u);
  uint64_t read_some(const Unit& u, OpenFile& f, uint64_t done, bool direct);
  bool verify_unit(const Unit& u);
  void finish_unit(const Unit& u);
  void fail(const std::string& kind, const std::string& message);
  // Runs a thread body, turning anything it throws into a load error.
  template <typename F>
  void guarded(const char* stage, F&& body);
  void maybe_throw(const char* stage) const;
  bool resident(const OpenFile& f, uint64_t off, uint64_t len) const;

  std::vector<FileJob> jobs_;
  ChunkPool* pool_;
  LoadOptions opts_;
  std::vector<Unit> units_;
  std::unique_ptr<OpenFile[]> files_;
  std::atomic<size_t> next_unit_{0};
  std::atomic<bool> cancelled_{false}, finished_{false};
  bool copy_stage_ = false, ring_mode_ = false;
  TaskQueue<size_t> copy_queue_;
  TaskQueue<Completed> completed_;
  TaskQueue<int64_t> free_ring_;
  std::mutex err_mu_;
  std::string error_kind_, error_message_;
  std::atomic<uint64_t> bytes_direct_{0}, bytes_cached_{0}, bytes_copied_{0}, bytes_verified_{0};
  std::atomic<uint64_t> ns_read_{0}, ns_verify_{0}, ns_copy_{0}, ns_wall_{0}, files_direct_refused_{0};
  std::chrono::steady_clock::time_point started_;
  std::thread runner_;
};

// Parallel memcpy, used for DRAM tier -> host "device" copies and as the
// memory-bandwidth limit in the benchmarks.
void parallel_copy(char* dst, const char* src, size_t n, int threads);
// Copies pool chunks (in order) into one contiguous destination of nbytes.
void copy_chunks(const ChunkPool& pool, const std::vector<int64_t>& chunks, size_t nbytes, char* dst,
                 int threads);

}  // namespace sllm
