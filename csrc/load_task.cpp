#include "load_task.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <stdexcept>
#include <system_error>

#include "host_memory.h"

#include "crc32c.h"

namespace sllm {
namespace {

using Clock = std::chrono::steady_clock;

uint64_t since(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
}

std::string basename_of(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

}  // namespace

GlobalCounters& global_counters() {
  static GlobalCounters counters;
  return counters;
}

LoadTask::LoadTask(std::vector<FileJob> jobs, ChunkPool* pool, LoadOptions opts, std::vector<int64_t> ring)
    : jobs_(std::move(jobs)), pool_(pool), opts_(std::move(opts)) {
  if (opts_.readers < 1) opts_.readers = 1;
  if (opts_.copiers < 1) opts_.copiers = 1;
  if (opts_.io_size == 0 || opts_.io_size % 4096) throw std::invalid_argument("io_size must be a multiple of 4096");
  ring_mode_ = !ring.empty();
  if (ring_mode_) {
    if (!pool) throw std::invalid_argument("a staging ring needs its pool");
    for (auto c : ring) pool->address(c);  // std::out_of_range for an id that is not the pool's
  }
  for (size_t j = 0; j < jobs_.size(); j++) {
    const FileJob& job = jobs_[j];
    if (job.block_size == 0 || job.block_size % 4096)
      throw std::invalid_argument("checksum block size must be a multiple of 4096");
    if (!job.crcs.empty() && job.crcs.size() != (job.nbytes + job.block_size - 1) / job.block_size)
      throw std::invalid_argument(job.path + ": wrong number of block checksums");
    const bool chunked = !job.chunks.empty();
    if (ring_mode_ && (chunked || job.dest))
      throw std::invalid_argument(job.path + ": a ring-mode job has neither chunks nor a destination");
    if (!ring_mode_ && !chunked && !job.dest && job.nbytes)
      throw std::invalid_argument(job.path + ": a job needs a destination or chunks");
    if (job.dest % 4096) throw std::invalid_argument("destination must be 4096-byte aligned");
    if (chunked && !pool) throw std::invalid_argument("chunks given without a pool");
    const size_t step = (chunked || ring_mode_) ? pool->chunk_size() : opts_.io_size;
    if (step % job.block_size) throw std::invalid_argument("chunk/io size must be a multiple of the block size");
    const size_t count = (job.nbytes + step - 1) / step;
    if (chunked && job.chunks.size() != count)
      throw std::invalid_argument(job.path + ": " + std::to_string(count) + " chunks needed, " +
                                  std::to_string(job.chunks.size()) + " given");
    if (chunked && job.dest) copy_stage_ = true;
    for (size_t i = 0; i < count; i++) {
      uint64_t off = i * step, len = std::min<uint64_t>(step, job.nbytes - off);
      char* staging = nullptr;
      int64_t chunk = -1;
      if (chunked) {
        chunk = job.chunks[i];
        staging = pool->address(chunk);
      } else if (!ring_mode_) {
        staging = reinterpret_cast<char*>(job.dest) + off;
      }
      units_.push_back({static_cast<int>(j), static_cast<int64_t>(i), off, len, staging, chunk});
    }
  }
  for (auto c : ring) free_ring_.push(c);
  files_.reset(new OpenFile[jobs_.size()]);
  // Interleave the partition files so every file streams from the start.
  std::stable_sort(units_.begin(), units_.end(), [](const Unit& a, const Unit& b) { return a.index < b.index; });
  global_counters().loads++;
  started_ = Clock::now();
  global_counters().load_clock.begin(started_);
  try {
    runner_ = std::thread([this] { run(); });
  } catch (...) {
    global_counters().load_clock.end(started_);
    throw;
  }
}

LoadTask::~LoadTask() {
  cancel();
  if (runner_.joinable()) runner_.join();
}

void LoadTask::cancel() {
  if (!finished_.load()) {
    cancelled_ = true;
    fail("cancelled", "the load was cancelled");
  }
}

bool LoadTask::wait() {
  if (runner_.joinable()) runner_.join();
  return error_kind_.empty();
}

std::optional<Completed> LoadTask::next_completed(std::chrono::milliseconds timeout) {
  auto item = completed_.pop_for(timeout);
  if (item) return item;
  if (completed_.closed_and_empty()) return Completed{-1, -1, -1};
  return std::nullopt;
}

void LoadTask::recycle(int64_t chunk) { free_ring_.push(chunk); }

LoadStats LoadTask::stats() const {
  LoadStats s;
  s.bytes_direct = bytes_direct_;
  s.bytes_cached = bytes_cached_;
  s.bytes_copied = bytes_copied_;
  s.bytes_verified = bytes_verified_;
  s.ns_read = ns_read_;
  s.ns_verify = ns_verify_;
  s.ns_copy = ns_copy_;
  s.ns_wall = ns_wall_;
  s.files_direct_refused = files_direct_refused_;
  s.used_direct = bytes_direct_ > 0;
  return s;
}

void LoadTask::fail(const std::string& kind, const std::string& message) {
  {
    std::lock_guard<std::mutex> lock(err_mu_);
    if (error_kind_.empty()) {
      error_kind_ = kind;
      error_message_ = message;
    }
    cancelled_ = true;
  }
  free_ring_.close();  // wakes readers waiting for a staging chunk
}

template <typename F>
void LoadTask::guarded(const char* stage, F&& body) {
  try {
    body();
  } catch (const std::exception& e) {
    fail("internal", std::string("the loader's ") + stage + " thread failed: " + e.what());
  } catch (...) {
    fail("internal", std::string("the loader's ") + stage + " thread failed with an unknown exception");
  }
}

void LoadTask::maybe_throw(const char* stage) const {
  if (opts_.debug_throw != stage) return;
  if (opts_.debug_throw_foreign) throw 42;  // not a std::exception
  throw std::logic_error(std::string("debug_throw in the ") + stage);
}

void LoadTask::run() {
  guarded("runner", [this] { run_stages(); });
  for (size_t j = 0; j < jobs_.size(); j++) {
    OpenFile& f = files_[j];
    if (f.map) munmap(f.map, jobs_[j].nbytes);
    if (f.fd_direct >= 0) ::close(f.fd_direct);
    if (f.fd_buffered >= 0) ::close(f.fd_buffered);
  }
  const auto ended = Clock::now();
  ns_wall_ = std::chrono::duration_cast<std::chrono::nanoseconds>(ended - started_).count();
  global_counters().ns_load_sum += ns_wall_;
  global_counters().load_clock.end(ended);
  if (!error_kind_.empty()) global_counters().failures++;
  finished_ = true;
  completed_.close();
}

void LoadTask::run_stages() {
  maybe_throw("runner");
  for (size_t j = 0; j < jobs_.size() && !cancelled_; j++) {
    const FileJob& job = jobs_[j];
    OpenFile& f = files_[j];
    f.fd_buffered = ::open(job.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (f.fd_buffered < 0) {
      fail(errno == ENOENT ? "missing" : "io", job.path + ": cannot open data file: " + std::strerror(errno));
      return;
    }
    struct stat st {};
    fstat(f.fd_buffered, &st);
    if (static_cast<uint64_t>(st.st_size) < job.nbytes) {
      fail("truncated", job.path + ": data file is " + std::to_string(st.st_size) + " bytes, the index expects " +
                            std::to_string(job.nbytes) + " (truncated at offset " + std::to_string(st.st_size) + ")");
      return;
    }
    if (opts_.direct) f.fd_direct = ::open(job.path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (opts_.direct && f.fd_direct < 0) files_direct_refused_++;
    if (job.nbytes) {
      f.map = mmap(nullptr, job.nbytes, PROT_READ, MAP_SHARED, f.fd_buffered, 0);
      if (f.map == MAP_FAILED) f.map = nullptr;
    }
  }
  if (cancelled_) return;
  // Threads are joined on every path, also when starting one of them throws.
  std::vector<std::thread> readers, copiers;
  std::thread prefault;
  auto join_all = [&] {
    for (auto& t : readers) t.join();
    if (prefault.joinable()) prefault.join();
    copy_queue_.close();
    for (auto& t : copiers) t.join();
  };
  try {
    for (int i = 0; i < opts_.readers; i++) readers.emplace_back([this] { reader(); });
    if (copy_stage_)
      for (int i = 0; i < opts_.copiers; i++) copiers.emplace_back([this] { copier(); });
    if (opts_.prefault_dest) prefault = std::thread([this] { prefaulter(); });
  } catch (...) {
    fail("internal", "the loader could not start its threads");
    join_all();
    throw;
  }
  join_all();
}

bool LoadTask::resident(const OpenFile& f, uint64_t off, uint64_t len) const {
  if (!f.map) return false;
  const size_t pages = (len + 4095) / 4096;
  std::vector<unsigned char> vec(pages);
  if (mincore(static_cast<char*>(f.map) + off, len, vec.data()) != 0) return false;
  for (unsigned char v : vec)
    if (!(v & 1)) return false;
  return true;
}

// One pread at u.offset + done; returns the bytes read (0 = end of file). Direct
// requests are whole 4096-byte blocks: the caller finishes an unaligned tail buffered.
uint64_t LoadTask::read_some(const Unit& u, OpenFile& f, uint64_t done, bool direct) {
  const FileJob& job = jobs_[u.job];
  GlobalCounters& g = global_counters();
  const uint64_t want = direct ? (u.length - done) / 4096 * 4096 : u.length - done;
  for (;;) {
    ssize_t r;
    {
      BusyClock::Scope busy(direct ? g.direct_clock : g.cached_clock);
      if (direct && u.job == opts_.debug_refuse_direct_job) {
        r = -1;
        errno = EINVAL;
      } else {
        r = ::pread(direct ? f.fd_direct : f.fd_buffered, u.staging + done, want, u.offset + done);
      }
    }
    if (r >= 0) {
      (direct ? bytes_direct_ : bytes_cached_) += r;
      (direct ? g.bytes_direct : g.bytes_cached) += r;
      return static_cast<uint64_t>(r);
    }
    if (errno == EINTR) continue;
    if (direct && errno == EINVAL) {  // an aligned request refused: this file's filesystem has no O_DIRECT
      if (f.direct_ok.exchange(false)) files_direct_refused_++;
      return read_some(u, f, done, false);
    }
    throw std::runtime_error("io|" + job.path + ": read failed at offset " + std::to_string(u.offset + done) + ": " +
                             std::strerror(errno));
  }
}

void LoadTask::read_unit(const Unit& u) {
  const FileJob& job = jobs_[u.job];
  OpenFile& f = files_[u.job];
  const auto t0 = Clock::now();
  BusyClock::Scope busy(global_counters().read_clock);
  // Data already in the page cache is copied from there; the rest comes
  // straight from the device with O_DIRECT (no second copy, no cache pollution).
  bool direct = f.fd_direct >= 0 && f.direct_ok && !resident(f, u.offset, u.length);
  uint64_t done = 0;
  while (done < u.length) {
    // A short direct read (or an unaligned tail) leaves an unaligned remainder:
    // that part is read buffered, and the file stays direct for its other units.
    if (direct && (done % 4096 || u.length - done < 4096)) direct = false;
    const uint64_t r = read_some(u, f, done, direct && f.direct_ok);
    if (r == 0)
      throw std::runtime_error("truncated|" + job.path + ": unexpected end of file at offset " +
                               std::to_string(u.offset + done));
    done += r;
  }
  ns_read_ += since(t0);
}

bool LoadTask::verify_unit(const Unit& u) {
  const FileJob& job = jobs_[u.job];
  if (job.crcs.empty()) return true;
  const auto t0 = Clock::now();
  for (uint64_t off = 0; off < u.length; off += job.block_size) {
    const uint64_t len = std::min<uint64_t>(job.block_size, u.length - off);
    const uint64_t block = (u.offset + off) / job.block_size;
    const uint32_t got = crc32c(0, u.staging + off, len);
    if (got != job.crcs[block]) {
      fail("checksum", job.path + ": checksum mismatch in block " + std::to_string(block) + " (bytes " +
                           std::to_string(u.offset + off) + "-" + std::to_string(u.offset + off + len) +
                           "): stored " + hex32(job.crcs[block]) + ", computed " + hex32(got));
      return false;
    }
  }
  bytes_verified_ += u.length;
  global_counters().bytes_verified += u.length;
  ns_verify_ += since(t0);
  return true;
}

void LoadTask::finish_unit(const Unit& u) {
  if (opts_.notify || ring_mode_) completed_.push({u.job, u.index, u.chunk});
}

void LoadTask::reader() {
  guarded("reader", [this] { read_units(); });
}

void LoadTask::read_units() {
  maybe_throw("reader");
  while (!cancelled_) {
    const size_t i = next_unit_++;
    if (i >= units_.size()) return;
    Unit u = units_[i];
    if (ring_mode_) {
      auto chunk = free_ring_.pop();  // waits for the consumer to give a chunk back
      if (!chunk || cancelled_) return;
      u.chunk = *chunk;
      u.staging = pool_->address(u.chunk);
    }
    try {
      read_unit(u);
    } catch (const std::runtime_error& e) {
      std::string what = e.what();
      auto bar = what.find('|');
      if (bar == std::string::npos) throw;
      fail(what.substr(0, bar), what.substr(bar + 1));
      return;
    }
    if (!verify_unit(u)) return;
    if (copy_stage_)
      copy_queue_.push(i);
    else
      finish_unit(u);
  }
}

void LoadTask::prefaulter() {
  guarded("prefaulter", [this] { prefault_units(); });
}

// Fresh destination memory costs a page fault per page on first touch (slow in
// a VM). Faulting it in here, a few units ahead of the readers, overlaps that
// work with the disk instead of doing it inside each read.
void LoadTask::prefault_units() {
  maybe_throw("prefaulter");
  for (size_t i = 0; i < units_.size() && !cancelled_; i++) {
    const Unit& u = units_[i];
    const FileJob& job = jobs_[u.job];
    if (!job.dest) continue;
    if (i > next_unit_.load() + 64) {  // far enough ahead: readers will not catch up soon
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      i--;
      continue;
    }
    if (i + 1 < next_unit_.load()) continue;  // the readers are already past it
    prefault_host(reinterpret_cast<char*>(job.dest) + u.offset, u.length, 1);
  }
}

void LoadTask::copier() {
  guarded("copier", [this] { copy_units(); });
  if (cancelled_)  // a failed copier: drain so the readers never block on a full queue
    while (copy_queue_.pop()) {
    }
}

void LoadTask::copy_units() {
  maybe_throw("copier");
  GlobalCounters& g = global_counters();
  while (auto i = copy_queue_.pop()) {
    if (cancelled_) continue;  // drain without copying
    const Unit& u = units_[*i];
    const auto t0 = Clock::now();
    {
      BusyClock::Scope busy(g.copy_clock);
      std::memcpy(reinterpret_cast<char*>(jobs_[u.job].dest) + u.offset, u.staging, u.length);
    }
    ns_copy_ += since(t0);
    bytes_copied_ += u.length;
    g.bytes_copied += u.length;
    finish_unit(u);
  }
}

namespace {

// Runs work() on `threads` threads (this one included). Work items must not
// throw. A thread that cannot be started (std::system_error) is simply not
// there: the others, this one at least, take its share.
template <typename F>
void on_threads(int threads, F&& work) {
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; t++) {
    try {
      pool.emplace_back(work);
    } catch (const std::system_error&) {
      break;
    }
  }
  work();
  for (auto& t : pool) t.join();
}

}  // namespace

void parallel_copy(char* dst, const char* src, size_t n, int threads) {
  if (threads < 1) threads = 1;
  const size_t per = round_up((n + threads - 1) / threads, 4096);
  std::atomic<size_t> next{0};
  on_threads(threads, [&] {
    for (size_t lo; (lo = next.fetch_add(per)) < n;) std::memcpy(dst + lo, src + lo, std::min(per, n - lo));
  });
}

void copy_chunks(const ChunkPool& pool, const std::vector<int64_t>& chunks, size_t nbytes, char* dst, int threads) {
  const size_t cs = pool.chunk_size();
  if (chunks.size() * cs < nbytes) throw std::invalid_argument("too few chunks for the destination");
  std::vector<const char*> src;  // resolved here: pool.address() throws on a bad id, a worker must not
  for (size_t i = 0; i * cs < nbytes; i++) src.push_back(pool.address(chunks[i]));
  GlobalCounters& g = global_counters();
  BusyClock::Scope busy(g.copy_clock);
  std::atomic<size_t> next{0};
  on_threads(threads, [&] {
    for (size_t i; (i = next++) < src.size();) std::memcpy(dst + i * cs, src[i], std::min(cs, nbytes - i * cs));
  });
  g.bytes_copied += nbytes;
}

}  // namespace sllm
