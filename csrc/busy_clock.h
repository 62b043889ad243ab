// Elapsed time during which at least one activity of a kind was running: the
// union of overlapping intervals. Two loads that overlap for their whole second
// count one second, so bytes / ns() is a true bandwidth, not a per-thread rate.
#pragma once
#include <chrono>
#include <cstdint>
#include <mutex>

namespace sllm {

class BusyClock {
 public:
  using Clock = std::chrono::steady_clock;
  // With explicit times, a caller's own elapsed time (t1 - t0) and the union agree exactly.
  void begin(Clock::time_point t = Clock::now()) {
    std::lock_guard<std::mutex> lock(mu_);
    if (active_++ == 0) since_ = t;
  }
  void end(Clock::time_point t = Clock::now()) {
    std::lock_guard<std::mutex> lock(mu_);
    if (active_ == 0) return;
    if (--active_ == 0 && t > since_)
      total_ += std::chrono::duration_cast<std::chrono::nanoseconds>(t - since_).count();
  }
  // Time with something running, up to now (an activity in progress counts so far).
  uint64_t ns() const {
    std::lock_guard<std::mutex> lock(mu_);
    return total_ + (active_ ? elapsed_since(since_) : 0);
  }

  class Scope {
   public:
    explicit Scope(BusyClock& c) : c_(c) { c_.begin(); }
    ~Scope() { c_.end(); }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    BusyClock& c_;
  };

 private:
  static uint64_t elapsed_since(Clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count();
  }
  mutable std::mutex mu_;
  uint64_t active_ = 0, total_ = 0;
  Clock::time_point since_{};
};

}  // namespace sllm
