// The part of ATen the extension uses: Tensor and its methods, and the
// factories the kernels call. <ATen/ATen.h> declares every operator and
// costs most of a translation unit's compile time (29 s of the parse against
// 10 s here); build_flags.py defines TORCH_ASSERT_ONLY_METHOD_OPERATORS,
// which makes including it an error.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
