// The SIMT execution layer (regops/simt/runtime.h): launches, the fiber
// scheduler of a block, barriers, warp collectives and shared memory.
//
// One OS thread runs one block at a time: it creates a fiber per CUDA thread
// (ucontext, on stacks pooled per OS thread) and runs, until none is left, a
// fiber drawn at random from those ready. A fiber gives up the CPU only at a
// barrier, at a warp collective or when it exits, so a missing barrier shows
// up as a read of shared memory that nobody has written yet (0xff bytes: NaN)
// or as a result that changes with the schedule seed. When no fiber is ready
// and some have not exited, the block is deadlocked on the GPU too: that is
// reported, with the threads and source lines involved, instead of a hang.
#include "regops/simt/runtime.h"

#include <ATen/Parallel.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define REGOPS_SIMT_ASAN 1
#else
#define REGOPS_SIMT_ASAN 0
#endif

thread_local uint3 threadIdx{0, 0, 0};
thread_local uint3 blockIdx{0, 0, 0};
thread_local dim3 blockDim{1, 1, 1};
thread_local dim3 gridDim{1, 1, 1};

namespace regops {
namespace simt {

const DeviceProperties& h100_properties() {
  static const DeviceProperties properties = [] {
    DeviceProperties p{};
    std::snprintf(p.name, sizeof(p.name), "%s", "NVIDIA H100 (regops SIMT simulation)");
    p.multiProcessorCount = 132;
    p.maxThreadsPerMultiProcessor = 2048;
    p.maxBlocksPerMultiProcessor = 32;
    p.warpSize = 32;
    p.maxThreadsPerBlock = 1024;
    p.maxThreadsDim[0] = 1024;
    p.maxThreadsDim[1] = 1024;
    p.maxThreadsDim[2] = 64;
    p.maxGridSize[0] = 2147483647;
    p.maxGridSize[1] = 65535;
    p.maxGridSize[2] = 65535;
    p.sharedMemPerBlock = 48 * 1024;
    p.sharedMemPerBlockOptin = 227 * 1024;
    p.sharedMemPerMultiprocessor = 228 * 1024;
    p.reservedSharedMemPerBlock = 1024;
    p.regsPerBlock = 65536;
    p.major = 9;
    p.minor = 0;
    return p;
  }();
  return properties;
}

namespace {

constexpr int kWarp = 32;
// Fiber stacks: the kernels need a few KiB; ASan's redzones need more.
constexpr size_t kStackBytes = REGOPS_SIMT_ASAN ? 512 * 1024 : 64 * 1024;

std::string position(uint3 v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

std::string position(dim3 v) { return position(uint3{v.x, v.y, v.z}); }

std::string hex(uint64_t value) {
  std::ostringstream out;
  out << "0x" << std::hex << value;
  return out.str();
}

std::string source(const char* file, int line) {
  return std::string(file != nullptr ? file : "?") + ":" + std::to_string(line);
}

const char* collective_name(Collective kind) {
  switch (kind) {
    case Collective::shfl: return "__shfl_sync";
    case Collective::shfl_up: return "__shfl_up_sync";
    case Collective::shfl_down: return "__shfl_down_sync";
    case Collective::shfl_xor: return "__shfl_xor_sync";
    case Collective::ballot: return "__ballot_sync";
    case Collective::any: return "__any_sync";
    case Collective::all: return "__all_sync";
    case Collective::syncwarp: return "__syncwarp";
  }
  return "?";
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A fault of the kernel (not of the simulation): the fiber's entry turns it
// into the block's error.
struct KernelFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Fiber stacks of one OS thread, reused by every block it runs. The lowest
// page of each is a guard page, so a stack overflow faults instead of
// corrupting the neighbouring fiber.
class StackPool {
 public:
  ~StackPool() {
    for (void* base : mappings_) munmap(base, kStackBytes + page());
  }
  void* stack(size_t i) {
    while (mappings_.size() <= i) {
      void* base = mmap(nullptr, kStackBytes + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(base != MAP_FAILED, "regops CUDA simulation: cannot map a fiber stack");
      TORCH_CHECK(mprotect(base, page(), PROT_NONE) == 0, "regops CUDA simulation: cannot protect a fiber stack");
      mappings_.push_back(base);
    }
    return static_cast<char*>(mappings_[i]) + page();
  }

 private:
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  std::vector<void*> mappings_;
};

enum class FiberState { ready, at_barrier, at_collective, done };

struct Fiber {
  ucontext_t context;
  void* stack = nullptr;
  uint3 index{0, 0, 0};
  int lane = 0;
  int warp = 0;
  FiberState state = FiberState::ready;
  const char* file = nullptr;  // where it waits
  int line = 0;
  // Its part of a warp collective.
  uint64_t value = 0;
  int argument = 0;
  uint64_t result = 0;
  void* fake_stack = nullptr;  // ASan's, while switched out
};

struct PendingCollective {
  bool active = false;
  Collective kind = Collective::syncwarp;
  unsigned mask = 0;
  int width = kWarp;
  unsigned arrived = 0;
  const char* file = nullptr;
  int line = 0;
};

struct Launch {
  dim3 grid, block;
  size_t dynamic_shared_bytes;
  BlockEntry entry;
  const void* payload;
};

// The state of the block an OS thread is running, reused from block to block.
struct Worker {
  const Launch* launch = nullptr;
  int threads = 0;
  std::vector<Fiber> fibers;
  std::vector<Fiber*> ready;
  std::vector<PendingCollective> warps;
  std::vector<unsigned> exited;  // per warp: lanes that have returned
  int at_barrier = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  uint64_t rng = 0;
  std::string error;
  StackPool stacks;
  // Shared memory: dynamic first, then the static arrays in the order their
  // declarations are first reached.
  std::unique_ptr<unsigned char[]> shared{new unsigned char[227 * 1024 + 256]};
  size_t shared_used = 0;
  size_t static_shared = 0;
  std::vector<std::pair<const void*, size_t>> allocations;

  unsigned char* shared_base() {
    const auto address = reinterpret_cast<uintptr_t>(shared.get());
    return reinterpret_cast<unsigned char*>((address + 255) & ~uintptr_t{255});
  }
  unsigned existing_lanes(int warp) const {
    const int lanes = std::min(kWarp, threads - warp * kWarp);
    return lanes == kWarp ? 0xffffffffu : (1u << lanes) - 1u;
  }
  uint64_t next_random() {
    rng = splitmix64(rng);
    return rng;
  }
};

thread_local Worker* tls_worker = nullptr;

Worker& worker() {
  if (tls_worker == nullptr) tls_worker = new Worker();  // one per OS thread, for the life of the process
  return *tls_worker;
}

Fiber& current_fiber(const char* what) {
  Worker* w = tls_worker;
  if (w == nullptr || w->current == nullptr) {
    throw KernelFault(std::string(what) + " called outside a kernel");
  }
  return *w->current;
}

// ---- fiber switches (annotated for ASan, which must know the stack in use) -------

void switch_to_fiber(Worker& w, Fiber& f) {
  w.current = &f;
  threadIdx = f.index;
#if REGOPS_SIMT_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, f.stack, kStackBytes);
#endif
  swapcontext(&w.scheduler, &f.context);
#if REGOPS_SIMT_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
  w.current = nullptr;
}

void switch_to_scheduler(Worker& w, Fiber& f, bool exiting) {
#if REGOPS_SIMT_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, w.scheduler_stack, w.scheduler_stack_size);
#else
  (void)exiting;
#endif
  swapcontext(&f.context, &w.scheduler);
#if REGOPS_SIMT_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &w.scheduler_stack, &w.scheduler_stack_size);
#endif
}

void fiber_main() {
  Worker& w = *tls_worker;
  Fiber& f = *w.current;
#if REGOPS_SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w.scheduler_stack, &w.scheduler_stack_size);
#endif
  try {
    w.launch->entry(w.launch->payload);
  } catch (const c10::Error& e) {
    if (w.error.empty()) w.error = "thread " + position(f.index) + ": " + e.what_without_backtrace();
  } catch (const std::exception& e) {
    if (w.error.empty()) w.error = "thread " + position(f.index) + ": " + e.what();
  }
  f.state = FiberState::done;
  w.exited[f.warp] |= 1u << f.lane;
  switch_to_scheduler(w, f, /*exiting=*/true);
  std::abort();  // an exited fiber is never resumed
}

// ---- deadlock diagnosis --------------------------------------------------------------

std::string describe_wait(const Fiber& f) {
  switch (f.state) {
    case FiberState::done: return "has exited";
    case FiberState::at_barrier: return "waits at __syncthreads() at " + source(f.file, f.line);
    case FiberState::at_collective: return "waits at a warp collective at " + source(f.file, f.line);
    case FiberState::ready: return "is ready";
  }
  return "?";
}

std::string diagnose_deadlock(Worker& w) {
  for (size_t warp = 0; warp < w.warps.size(); ++warp) {
    const PendingCollective& p = w.warps[warp];
    if (!p.active) continue;
    const unsigned missing = p.mask & ~p.arrived;
    const int lane = __builtin_ctz(missing);
    const Fiber& absent = w.fibers[warp * kWarp + lane];
    return "divergent warp collective: " + std::string(collective_name(p.kind)) + " (mask " + hex(p.mask) + ") at " +
           source(p.file, p.line) + " in warp " + std::to_string(warp) + ": lanes " + hex(p.arrived) +
           " wait for lane " + std::to_string(lane) + " (thread " + position(absent.index) + "), which " +
           describe_wait(absent);
  }
  for (const Fiber& f : w.fibers) {
    if (f.state == FiberState::done) {
      return "__syncthreads() at " + source(w.barrier_file, w.barrier_line) + " reached by " +
             std::to_string(w.at_barrier) + " of " + std::to_string(w.threads) + " threads: thread " +
             position(f.index) + " has exited without reaching it (a barrier in divergent code)";
    }
  }
  return "deadlock: no thread can proceed";
}

// ---- one block -----------------------------------------------------------------------

// Runs block `index` of the launch on this OS thread; returns its error ("" if none).
std::string run_block(const Launch& launch, uint3 index, uint64_t seed) {
  Worker& w = worker();
  w.launch = &launch;
  w.threads = static_cast<int>(launch.block.x * launch.block.y * launch.block.z);
  w.fibers.resize(w.threads);
  const int warps = (w.threads + kWarp - 1) / kWarp;
  w.warps.assign(warps, PendingCollective{});
  w.exited.assign(warps, 0u);
  w.ready.clear();
  w.at_barrier = 0;
  w.error.clear();
  w.rng = seed;
  w.allocations.clear();
  w.shared_used = (launch.dynamic_shared_bytes + 15) / 16 * 16;
  w.static_shared = 0;
  std::memset(w.shared_base(), 0xff, launch.dynamic_shared_bytes);
  blockIdx = index;
  blockDim = launch.block;
  gridDim = launch.grid;
  for (int i = 0; i < w.threads; ++i) {
    Fiber& f = w.fibers[i];
    f.stack = w.stacks.stack(i);
#if REGOPS_SIMT_ASAN
    // An aborted block leaves its fibers' frames poisoned.
    __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
    f.index = uint3{static_cast<unsigned>(i) % launch.block.x,
                    static_cast<unsigned>(i) / launch.block.x % launch.block.y,
                    static_cast<unsigned>(i) / (launch.block.x * launch.block.y)};
    f.lane = i % kWarp;
    f.warp = i / kWarp;
    f.state = FiberState::ready;
    f.fake_stack = nullptr;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
    w.ready.push_back(&f);
  }
  while (!w.ready.empty() && w.error.empty()) {
    const size_t pick = w.next_random() % w.ready.size();
    Fiber& f = *w.ready[pick];
    w.ready[pick] = w.ready.back();
    w.ready.pop_back();
    f.state = FiberState::ready;
    switch_to_fiber(w, f);
  }
  if (w.error.empty()) {
    for (const Fiber& f : w.fibers) {
      if (f.state != FiberState::done) {
        w.error = diagnose_deadlock(w);
        break;
      }
    }
  }
  w.launch = nullptr;
  return w.error.empty() ? std::string() : "block " + position(index) + ", " + w.error;
}

void complete_collective(Worker& w, int warp) {
  PendingCollective& p = w.warps[warp];
  Fiber* lanes = &w.fibers[warp * kWarp];
  uint64_t votes = 0;
  for (int l = 0; l < kWarp; ++l) {
    if ((p.mask >> l & 1u) && lanes[l].value != 0) votes |= 1ull << l;
  }
  for (int l = 0; l < kWarp; ++l) {
    if (!(p.mask >> l & 1u)) continue;
    Fiber& g = lanes[l];
    const int segment = l & ~(p.width - 1);
    const int offset = l - segment;
    int source_lane = l;
    switch (p.kind) {
      case Collective::shfl: source_lane = segment + (g.argument & (p.width - 1)); break;
      case Collective::shfl_up: source_lane = offset >= g.argument ? l - g.argument : l; break;
      case Collective::shfl_down: source_lane = offset + g.argument < p.width ? l + g.argument : l; break;
      case Collective::shfl_xor: {
        const int target = l ^ g.argument;
        source_lane = target < segment + p.width && target < kWarp ? target : l;
        break;
      }
      default: break;
    }
    switch (p.kind) {
      case Collective::ballot: g.result = votes; break;
      case Collective::any: g.result = votes != 0; break;
      case Collective::all: g.result = votes == p.mask; break;
      case Collective::syncwarp: g.result = 0; break;
      default:
        if (source_lane < 0 || !(p.mask >> source_lane & 1u)) {
          throw KernelFault(std::string(collective_name(p.kind)) + " at " + source(p.file, p.line) + ": lane " +
                            std::to_string(l) + " of warp " + std::to_string(warp) + " reads lane " +
                            std::to_string(source_lane) + ", which is not in the mask " + hex(p.mask) +
                            " (an undefined value on the GPU)");
        }
        g.result = lanes[source_lane].value;
    }
    g.state = FiberState::ready;
    w.ready.push_back(&g);
  }
  p.active = false;
}

// ---- launches --------------------------------------------------------------------------

std::atomic<uint64_t> schedule_seed{[] {
  const char* text = std::getenv("REGOPS_CUDA_SIM_SEED");
  return text != nullptr ? std::strtoull(text, nullptr, 0) : uint64_t{0};
}()};
std::atomic<uint64_t> launch_count{0};
thread_local std::string last_launch_error;

std::mutex log_mutex;
std::vector<LaunchRecord> launch_log;
constexpr size_t kLogLimit = 4096;

// What the GPU answers to this configuration ("" if it launches).
std::string launch_configuration_error(dim3 grid, dim3 block, size_t dynamic_shared_bytes) {
  const DeviceProperties& p = h100_properties();
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0 ||
      threads > static_cast<uint64_t>(p.maxThreadsPerBlock) || block.x > static_cast<unsigned>(p.maxThreadsDim[0]) ||
      block.y > static_cast<unsigned>(p.maxThreadsDim[1]) || block.z > static_cast<unsigned>(p.maxThreadsDim[2]) ||
      grid.x > static_cast<unsigned>(p.maxGridSize[0]) || grid.y > static_cast<unsigned>(p.maxGridSize[1]) ||
      grid.z > static_cast<unsigned>(p.maxGridSize[2])) {
    return "invalid configuration argument";
  }
  // Without the opt-in attribute (which these kernels do not set) a launch
  // gets at most 48 KiB of dynamic shared memory.
  if (dynamic_shared_bytes > p.sharedMemPerBlock) return "invalid argument";
  return "";
}

}  // namespace

// ---- entry points of runtime.h ------------------------------------------------------------

void fault(const std::string& message) { throw KernelFault(message); }

void check_vector_alignment(const void* pointer, size_t alignment, const char* access) {
  if (reinterpret_cast<uintptr_t>(pointer) % alignment != 0) {
    fault("misaligned address: " + std::to_string(alignment) + "-byte vector " + access + " at " +
          hex(reinterpret_cast<uintptr_t>(pointer)) + " (the GPU faults)");
  }
}

void sync_threads(const char* file, int line) {
  Fiber& f = current_fiber("__syncthreads()");
  Worker& w = *tls_worker;
  if (w.at_barrier > 0 && (w.barrier_line != line || std::strcmp(w.barrier_file, file) != 0)) {
    fault("__syncthreads() at " + source(file, line) + " while other threads wait at __syncthreads() at " +
          source(w.barrier_file, w.barrier_line) + " (a barrier in divergent code)");
  }
  w.barrier_file = file;
  w.barrier_line = line;
  f.state = FiberState::at_barrier;
  f.file = file;
  f.line = line;
  if (++w.at_barrier == w.threads) {
    w.at_barrier = 0;
    for (Fiber& g : w.fibers) {
      if (g.state == FiberState::at_barrier) w.ready.push_back(&g);
    }
  }
  switch_to_scheduler(w, f, false);
}

uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int argument, int width, const char* file,
                         int line) {
  Fiber& f = current_fiber(collective_name(kind));
  Worker& w = *tls_worker;
  const std::string where = std::string(collective_name(kind)) + " at " + source(file, line) + ": lane " +
                            std::to_string(f.lane) + " of warp " + std::to_string(f.warp);
  if (!(mask >> f.lane & 1u)) fault(where + " is not in its mask " + hex(mask));
  if (width < 1 || width > kWarp || (width & (width - 1)) != 0) {
    fault(where + ": width " + std::to_string(width) + " is not a power of two in [1, 32]");
  }
  const unsigned absent = mask & ~w.existing_lanes(f.warp);
  if (absent != 0) {
    fault(where + ": the mask " + hex(mask) + " names lanes " + hex(absent) + " that this block of " +
          std::to_string(w.threads) + " threads does not have");
  }
  const unsigned exited = mask & w.exited[f.warp];
  if (exited != 0) fault(where + ": lanes " + hex(exited) + " named in the mask have exited (divergence)");
  PendingCollective& p = w.warps[f.warp];
  if (p.active && (p.kind != kind || p.mask != mask || p.width != width)) {
    fault(where + " (mask " + hex(mask) + ") while lanes " + hex(p.arrived) + " wait in " +
          collective_name(p.kind) + " (mask " + hex(p.mask) + ") at " + source(p.file, p.line) + " (divergence)");
  }
  if (!p.active) p = PendingCollective{true, kind, mask, width, 0u, file, line};
  p.arrived |= 1u << f.lane;
  f.value = value;
  f.argument = argument;
  f.state = FiberState::at_collective;
  f.file = file;
  f.line = line;
  if (p.arrived == mask) complete_collective(w, f.warp);
  switch_to_scheduler(w, f, false);
  return f.result;
}

unsigned active_mask() {
  Fiber& f = current_fiber("__activemask()");
  const Worker& w = *tls_worker;
  return w.existing_lanes(f.warp) & ~w.exited[f.warp];
}

void* shared_allocation(const void* site, size_t bytes, size_t alignment, const char* name) {
  current_fiber("shared memory");
  Worker& w = *tls_worker;
  for (const auto& [known, offset] : w.allocations) {
    if (known == site) return w.shared_base() + offset;
  }
  const DeviceProperties& p = h100_properties();
  const size_t offset = (w.shared_used + alignment - 1) / alignment * alignment;
  if (w.static_shared + bytes > p.sharedMemPerBlock || offset + bytes > p.sharedMemPerBlockOptin) {
    fault("shared array " + std::string(name) + " of " + std::to_string(bytes) + " bytes: the block's static (" +
          std::to_string(w.static_shared + bytes) + " bytes) and dynamic (" +
          std::to_string(w.launch->dynamic_shared_bytes) + " bytes) shared memory exceed the H100's limits (48 KiB "
          "static, 227 KiB in all)");
  }
  std::memset(w.shared_base() + offset, 0xff, bytes);
  w.allocations.emplace_back(site, offset);
  w.shared_used = offset + bytes;
  w.static_shared += bytes;
  return w.shared_base() + offset;
}

void* dynamic_shared_memory(size_t* bytes) {
  current_fiber("dynamic shared memory");
  *bytes = tls_worker->launch->dynamic_shared_bytes;
  return tls_worker->shared_base();
}

void launch_kernel(dim3 grid, dim3 block, size_t dynamic_shared_bytes, BlockEntry entry, const void* payload) {
  TORCH_CHECK(tls_worker == nullptr || tls_worker->current == nullptr,
              "regops CUDA simulation: a kernel launch from device code is not supported");
  {
    const std::lock_guard<std::mutex> lock(log_mutex);
    if (launch_log.size() < kLogLimit) launch_log.push_back(LaunchRecord{grid, block, dynamic_shared_bytes});
  }
  const std::string configuration_error = launch_configuration_error(grid, block, dynamic_shared_bytes);
  if (!configuration_error.empty()) {
    last_launch_error = configuration_error + " (grid " + position(grid) + ", block " + position(block) + ", " +
                        std::to_string(dynamic_shared_bytes) + " bytes of dynamic shared memory)";
    return;
  }
  const Launch launch{grid, block, dynamic_shared_bytes, entry, payload};
  const uint64_t seed = schedule_seed.load();
  const uint64_t number = launch_count.fetch_add(1);
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  // A random order of the blocks: an affine permutation k -> (start + k * step)
  // mod blocks with step coprime to blocks (no table for a large grid).
  uint64_t mix = splitmix64(seed ^ splitmix64(number));
  const uint64_t start = mix % static_cast<uint64_t>(blocks);
  uint64_t step = splitmix64(mix) % static_cast<uint64_t>(blocks) | 1u;
  while (std::gcd(step, static_cast<uint64_t>(blocks)) != 1) step += 2;
  std::mutex error_mutex;
  std::string error;
  std::atomic<bool> failed{false};
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end && !failed.load(std::memory_order_relaxed); ++k) {
      const uint64_t linear = (start + static_cast<uint64_t>(k) * step) % static_cast<uint64_t>(blocks);
      const uint3 index{static_cast<unsigned>(linear % grid.x), static_cast<unsigned>(linear / grid.x % grid.y),
                        static_cast<unsigned>(linear / (uint64_t{grid.x} * grid.y))};
      std::string block_error;
      try {
        block_error = run_block(launch, index, splitmix64(mix ^ splitmix64(linear + 1)));
      } catch (const std::exception& e) {
        block_error = std::string("block ") + position(index) + ": " + e.what();
      }
      if (!block_error.empty()) {
        const std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = block_error;
        failed.store(true);
      }
    }
  });
  TORCH_CHECK(error.empty(), "CUDA simulation: kernel fault in ", error, " [grid ", position(grid), ", block ",
              position(block), ", schedule seed ", seed, ", launch ", number, "]");
}

void check_last_launch() {
  if (last_launch_error.empty()) return;
  const std::string message = std::move(last_launch_error);
  last_launch_error.clear();
  TORCH_CHECK(false, "CUDA error: ", message);
}

void set_schedule_seed(uint64_t seed) {
  schedule_seed.store(seed);
  launch_count.store(0);
}

std::vector<LaunchRecord> take_launch_log() {
  const std::lock_guard<std::mutex> lock(log_mutex);
  std::vector<LaunchRecord> records;
  records.swap(launch_log);
  return records;
}

}  // namespace simt

namespace cuda {

int occupancy_blocks_per_sm(int threads_per_block, size_t dynamic_shared_bytes) {
  const simt::DeviceProperties& p = simt::h100_properties();
  if (threads_per_block <= 0 || threads_per_block > p.maxThreadsPerBlock ||
      dynamic_shared_bytes > p.sharedMemPerBlockOptin) {
    return 0;
  }
  const int warps = (threads_per_block + p.warpSize - 1) / p.warpSize;
  const int by_threads = p.maxThreadsPerMultiProcessor / p.warpSize / warps;
  const size_t per_block = dynamic_shared_bytes + p.reservedSharedMemPerBlock;
  const int by_shared = static_cast<int>(p.sharedMemPerMultiprocessor / per_block);
  return std::min({by_threads, by_shared, p.maxBlocksPerMultiProcessor});
}

}  // namespace cuda
}  // namespace regops
