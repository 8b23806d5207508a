// Column layout of the launch tables that fused_optim/backends/plan.py builds, for C++ kernels.
//
// fused_optim/backends/plan.py is the source of truth (COL_*, TABLE_COLUMNS, HYPER_*,
// HYPER_COLUMNS); this header spells the same numbers for C++, and tests/test_cuda_sources.py
// checks every constant here against plan.py's (name COL_STEP_IS_DOUBLE <-> kColStepIsDouble).
// Change both together. Dependency-free (only <cstdint>): the CUDA kernels include it, and any
// other C++ kernel that walks the same tables can.
//
// * tensor_table: int64, kTableColumns per tensor.
// * hyper_table: float64, kHyperColumns per param group (a tensor's group is its kColGroup);
//   kHyperLrAddress holds the int64 bits of a device lr tensor's address (0 when none).
#pragma once

#include <cstdint>

namespace fused_optim {

// tensor_table columns.
constexpr std::int64_t kColParam = 0;          // param data pointer
constexpr std::int64_t kColState0 = 1;         // state data pointers (SGD: momentum buffer;
constexpr std::int64_t kColState1 = 2;         //   Adam: exp_avg, exp_avg_sq, max_exp_avg_sq),
constexpr std::int64_t kColState2 = 3;         //   0 where unused
constexpr std::int64_t kColMaster = 4;         // fp32 master weight pointer, or 0
constexpr std::int64_t kColNumel = 5;          // element count
constexpr std::int64_t kColStep = 6;           // offset below the group's base step, or the
                                               //   address of a step tensor
constexpr std::int64_t kColNewBuffer = 7;      // SGD: the momentum buffer is new this step
constexpr std::int64_t kColIndex = 8;          // param index (stochastic-rounding key)
constexpr std::int64_t kColStepIsDouble = 9;   // the step tensor is fp64 (else fp32)
constexpr std::int64_t kColGroup = 10;         // row of hyper_table
constexpr std::int64_t kTableColumns = 11;

// hyper_table columns (SGD keeps momentum and dampening where Adam keeps its betas).
constexpr std::int64_t kHyperLr = 0;
constexpr std::int64_t kHyperBeta1 = 1;
constexpr std::int64_t kHyperBeta2 = 2;
constexpr std::int64_t kHyperEps = 3;
constexpr std::int64_t kHyperWeightDecay = 4;
constexpr std::int64_t kHyperBaseStep = 5;
constexpr std::int64_t kHyperBiasCorrection1 = 6;       // 1 - beta1^base_step (torch.optim's
constexpr std::int64_t kHyperBiasCorrection2Sqrt = 7;   //   host fp64), sqrt(1 - beta2^base)
constexpr std::int64_t kHyperLrAddress = 8;
constexpr std::int64_t kHyperColumns = 9;
constexpr std::int64_t kHyperMomentum = kHyperBeta1;
constexpr std::int64_t kHyperDampening = kHyperBeta2;

}  // namespace fused_optim
