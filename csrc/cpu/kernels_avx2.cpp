// The CPU kernels for x86-64 with AVX2 + FMA (picked at run time where the CPU has them).
#include "kernels.h"

#ifdef RESNET_FUSED_AVX2_KERNELS
#pragma GCC target("avx2,fma,f16c")  // after every include: only the kernels below use it
#define RESNET_FUSED_ISA avx2
#include "kernels_impl.h"

namespace resnet_fused {
namespace cpu {
namespace avx2 {
// Constant-initialised (no code runs to build it on a CPU without AVX2).
const Kernels table = {"avx2", &bn_forward, &bn_backward, &scale_shift_act,
                        &scale_shift_act_backward};
}  // namespace avx2
}  // namespace cpu
}  // namespace resnet_fused
#endif
