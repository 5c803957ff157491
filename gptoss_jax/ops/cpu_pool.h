// The native kernels' threads: one pool per process, its workers kept between calls. A decode step
// makes ~170 kernel calls ~0.1 ms apart, and starting a std::thread costs ~53 us on the 2-core AMD
// EPYC (Zen 3) measured here, so a worker spins for the next call a while (kSpin) before it sleeps.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GPTOSS_PAUSE() _mm_pause()
#else
#define GPTOSS_PAUSE() ((void)0)
#endif

namespace gptoss {

class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    return *pool;  // never destroyed: workers may outlive static destructors
  }

  int Threads() const { return static_cast<int>(workers_.size()) + 1; }

  // fn(0), ..., fn(tasks - 1), on this thread and the workers; returns when all are done. A call
  // made while another runs (XLA may run two kernels at once) does its tasks on its own thread.
  void Run(int tasks, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(run_, std::try_to_lock);
    if (!busy.owns_lock() || workers_.empty() || tasks <= 1 || tasks >= (1 << 20)) {
      for (int t = 0; t < tasks; ++t) fn(t);
      return;
    }
    fn_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t generation = (state_.load(std::memory_order_relaxed) >> 40) + 1;
    {
      std::lock_guard<std::mutex> lock(sleep_);
      state_.store(generation << 40 | static_cast<uint64_t>(tasks) << 20, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    Drain(generation);
    while (done_.load(std::memory_order_acquire) < tasks) GPTOSS_PAUSE();
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(200);

  explicit Pool(int threads) {
    for (int t = 1; t < threads; ++t) workers_.emplace_back([this] { Loop(); });
    for (auto& worker : workers_) worker.detach();
  }

  // Claims and runs tasks of `generation` until none is left. state_ is one word, so that a claim
  // sees its run's generation, task count and next task together: generation << 40 | tasks << 20 | next.
  void Drain(uint64_t generation) {
    constexpr uint64_t kMask = (1u << 20) - 1;
    uint64_t state = state_.load(std::memory_order_acquire);
    while ((state >> 40) == generation && (state & kMask) < ((state >> 20) & kMask)) {
      if (!state_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel)) continue;
      (*fn_)(static_cast<int>(state & kMask));
      done_.fetch_add(1, std::memory_order_release);
      state = state_.load(std::memory_order_acquire);
    }
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      int polls = 0;
      while ((state_.load(std::memory_order_acquire) >> 40) == seen) {
        GPTOSS_PAUSE();
        if (++polls % 64 != 0 || std::chrono::steady_clock::now() - start < kSpin) continue;
        std::unique_lock<std::mutex> lock(sleep_);
        sleeping_.fetch_add(1, std::memory_order_acq_rel);
        wake_.wait(lock, [&] { return (state_.load(std::memory_order_acquire) >> 40) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
      }
      seen = state_.load(std::memory_order_acquire) >> 40;
      Drain(seen);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_, sleep_;
  std::condition_variable wake_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int> done_{0}, sleeping_{0};
  const std::function<void(int)>* fn_ = nullptr;
};

}  // namespace gptoss
