// The CPU kernels for the compiler's baseline instruction set (any CPU).
#include "kernels.h"

#define RESNET_FUSED_ISA generic
#include "kernels_impl.h"

namespace resnet_fused {
namespace cpu {
namespace generic {
const Kernels table = {"baseline", &bn_forward, &bn_backward, &scale_shift_act,
                        &scale_shift_act_backward};
}  // namespace generic
}  // namespace cpu
}  // namespace resnet_fused
