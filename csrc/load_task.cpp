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

LoadTask::LoadTask(std::vector<FileJob> jobs, ChunkPool* pool, LoadOptions opts)
    : jobs_(std::move(jobs)), pool_(pool), opts_(opts) {
  if (opts_.readers < 1) opts_.readers = 1;
  if (opts_.copiers < 1) opts_.copiers = 1;
  if (opts_.io_size == 0 || opts_.io_size % 4096) throw std::invalid_argument("io_size must be a multiple of 4096");
  for (size_t j = 0; j < jobs_.size(); j++) {
    const FileJob& job = jobs_[j];
    if (job.nbytes % 4096) throw std::invalid_argument(job.path + ": data length must be a multiple of 4096");
    if (job.block_size == 0 || job.block_size % 4096)
      throw std::invalid_argument("checksum block size must be a multiple of 4096");
    if (!job.crcs.empty() && job.crcs.size() != (job.nbytes + job.block_size - 1) / job.block_size)
      throw std::invalid_argument(job.path + ": wrong number of block checksums");
    const bool chunked = !job.chunks.empty();
    if (!chunked && !job.dest && job.nbytes)
      throw std::invalid_argument(job.path + ": a job needs a destination or chunks");
    if (job.dest % 4096) throw std::invalid_argument("destination must be 4096-byte aligned");
    const size_t step = chunked ? (pool ? pool->chunk_size() : 0) : opts_.io_size;
    if (chunked && !pool) throw std::invalid_argument("chunks given without a pool");
    if (step % job.block_size) throw std::invalid_argument("chunk/io size must be a multiple of the block size");
    const size_t count = (job.nbytes + step - 1) / step;
    if (chunked && job.chunks.size() != count)
      throw std::invalid_argument(job.path + ": " + std::to_string(count) + " chunks needed, " +
                                  std::to_string(job.chunks.size()) + " given");
    if (chunked && job.dest) copy_stage_ = true;
    for (size_t i = 0; i < count; i++) {
      uint64_t off = i * step, len = std::min<uint64_t>(step, job.nbytes - off);
      char* staging = chunked ? pool->address(job.chunks[i]) : reinterpret_cast<char*>(job.dest) + off;
      units_.push_back({static_cast<int>(j), static_cast<int64_t>(i), off, len, staging});
    }
  }
  // Interleave the partition files so every file streams from the start.
  std::stable_sort(units_.begin(), units_.end(), [](const Unit& a, const Unit& b) { return a.index < b.index; });
  global_counters().loads++;
  runner_ = std::thread([this] { run(); });
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

std::optional<std::pair<int, int64_t>> LoadTask::next_completed(std::chrono::milliseconds timeout) {
  auto item = completed_.pop_for(timeout);
  if (item) return item;
  if (completed_.closed_and_empty()) return std::make_pair(-1, int64_t{-1});
  return std::nullopt;
}

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
  s.used_direct = direct_ok_ && opts_.direct;
  return s;
}

void LoadTask::fail(const std::string& kind, const std::string& message) {
  std::lock_guard<std::mutex> lock(err_mu_);
  if (error_kind_.empty()) {
    error_kind_ = kind;
    error_message_ = message;
  }
  cancelled_ = true;
}

void LoadTask::run() {
  const auto t0 = Clock::now();
  files_.resize(jobs_.size());
  for (size_t j = 0; j < jobs_.size() && !cancelled_; j++) {
    const FileJob& job = jobs_[j];
    OpenFile& f = files_[j];
    f.fd_buffered = ::open(job.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (f.fd_buffered < 0) {
      fail(errno == ENOENT ? "missing" : "io", job.path + ": cannot open data file: " + std::strerror(errno));
      break;
    }
    struct stat st {};
    fstat(f.fd_buffered, &st);
    if (static_cast<uint64_t>(st.st_size) < job.nbytes) {
      fail("truncated", job.path + ": data file is " + std::to_string(st.st_size) + " bytes, the index expects " +
                            std::to_string(job.nbytes) + " (truncated at offset " + std::to_string(st.st_size) + ")");
      break;
    }
    if (opts_.direct) f.fd_direct = ::open(job.path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (job.nbytes) {
      f.map = mmap(nullptr, job.nbytes, PROT_READ, MAP_SHARED, f.fd_buffered, 0);
      if (f.map == MAP_FAILED) f.map = nullptr;
    }
  }
  if (!cancelled_) {
    std::vector<std::thread> threads;
    for (int i = 0; i < opts_.readers; i++) threads.emplace_back([this] { reader(); });
    std::vector<std::thread> copiers;
    if (copy_stage_)
      for (int i = 0; i < opts_.copiers; i++) copiers.emplace_back([this] { copier(); });
    std::thread prefault;
    if (opts_.prefault_dest) prefault = std::thread([this] { prefaulter(); });
    for (auto& t : threads) t.join();
    if (prefault.joinable()) prefault.join();
    copy_queue_.close();
    for (auto& t : copiers) t.join();
  }
  for (auto& f : files_) {
    if (f.map) munmap(f.map, jobs_[&f - files_.data()].nbytes);
    if (f.fd_direct >= 0) ::close(f.fd_direct);
    if (f.fd_buffered >= 0) ::close(f.fd_buffered);
  }
  ns_wall_ = since(t0);
  global_counters().ns_load_wall += ns_wall_;
  if (!error_kind_.empty()) global_counters().failures++;
  finished_ = true;
  completed_.close();
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

void LoadTask::read_unit(const Unit& u) {
  const FileJob& job = jobs_[u.job];
  const OpenFile& f = files_[u.job];
  const auto t0 = Clock::now();
  // Data already in the page cache is copied from there; the rest comes
  // straight from the device with O_DIRECT (no second copy, no cache pollution).
  const bool cached = resident(f, u.offset, u.length);
  bool direct = !cached && f.fd_direct >= 0 && direct_ok_;
  uint64_t done = 0;
  while (done < u.length) {
    const int fd = direct ? f.fd_direct : f.fd_buffered;
    ssize_t r = ::pread(fd, u.staging + done, u.length - done, u.offset + done);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (direct && errno == EINVAL) {  // the filesystem refuses O_DIRECT (e.g. tmpfs)
        direct_ok_ = false;
        direct = false;
        continue;
      }
      throw std::runtime_error("io|" + job.path + ": read failed at offset " + std::to_string(u.offset + done) +
                               ": " + std::strerror(errno));
    }
    if (r == 0)
      throw std::runtime_error("truncated|" + job.path + ": unexpected end of file at offset " +
                               std::to_string(u.offset + done));
    done += r;
  }
  (direct ? bytes_direct_ : bytes_cached_) += u.length;
  const uint64_t ns = since(t0);
  ns_read_ += ns;
  global_counters().bytes_read += u.length;
  global_counters().ns_read += ns;
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
  if (opts_.notify) completed_.push({u.job, u.index});
}

void LoadTask::reader() {
  while (!cancelled_) {
    const size_t i = next_unit_++;
    if (i >= units_.size()) return;
    const Unit& u = units_[i];
    try {
      read_unit(u);
    } catch (const std::runtime_error& e) {
      std::string what = e.what();
      auto bar = what.find('|');
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

// Fresh destination memory costs a page fault per page on first touch (slow in
// a VM). Faulting it in here, a few units ahead of the readers, overlaps that
// work with the disk instead of doing it inside each read.
void LoadTask::prefaulter() {
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
  while (auto i = copy_queue_.pop()) {
    if (cancelled_) continue;  // drain without copying
    const Unit& u = units_[*i];
    const auto t0 = Clock::now();
    std::memcpy(reinterpret_cast<char*>(jobs_[u.job].dest) + u.offset, u.staging, u.length);
    const uint64_t ns = since(t0);
    ns_copy_ += ns;
    bytes_copied_ += u.length;
    global_counters().bytes_copied += u.length;
    global_counters().ns_copy += ns;
    finish_unit(u);
  }
}

void parallel_copy(char* dst, const char* src, size_t n, int threads) {
  if (threads < 1) threads = 1;
  const size_t per = round_up((n + threads - 1) / threads, 4096);
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; t++) {
    size_t lo = t * per;
    if (lo >= n) break;
    size_t len = std::min(per, n - lo);
    pool.emplace_back([=] { std::memcpy(dst + lo, src + lo, len); });
  }
  std::memcpy(dst, src, std::min(per, n));
  for (auto& t : pool) t.join();
}

void copy_chunks(const ChunkPool& pool, const std::vector<int64_t>& chunks, size_t nbytes, char* dst, int threads) {
  const size_t cs = pool.chunk_size();
  if (chunks.size() * cs < nbytes) throw std::invalid_argument("too few chunks for the destination");
  const auto t0 = Clock::now();
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next++) < chunks.size();) {
      size_t off = i * cs;
      if (off >= nbytes) break;
      std::memcpy(dst + off, pool.address(chunks[i]), std::min(cs, nbytes - off));
    }
  };
  std::vector<std::thread> pool_threads;
  for (int t = 1; t < threads; t++) pool_threads.emplace_back(work);
  work();
  for (auto& t : pool_threads) t.join();
  global_counters().bytes_copied += nbytes;
  global_counters().ns_copy += since(t0);
}

}  // namespace sllm
