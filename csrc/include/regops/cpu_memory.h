// Host memory helpers shared by the CPU kernels.
#pragma once

#include "regops/aten.h"

#include <sys/mman.h>

#include <cstdint>

namespace regops {

// A fresh output of many megabytes is otherwise faulted in 4 KiB pages on
// first touch, which costs as much as the kernel itself. Asking for
// transparent huge pages before the first write cuts the faults 512-fold.
// Only advice: where the kernel says no, nothing changes.
inline void advise_huge_pages(const at::Tensor& fresh) {
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(fresh.data_ptr());
  const uintptr_t end = begin + fresh.nbytes();
  const uintptr_t aligned_begin = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t aligned_end = end & ~(kHugePage - 1);
  if (aligned_end > aligned_begin) {
    madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin, MADV_HUGEPAGE);
  }
}

}  // namespace regops
