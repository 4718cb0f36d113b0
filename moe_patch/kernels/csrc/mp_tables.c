/* Baseline-ISA part of the library: constant tables filled once when the library is loaded, and the ABI
 * version. Compiled without any -m flag, so loading the library never executes an instruction the CPU
 * may lack; the variant objects (mp_kernels.c) only run after a probe proved they work here. */
#include <math.h>
#include <string.h>

#include "mp_common.h"

#define EXPORTED __attribute__((visibility("default")))

/* MXFP4: the value of code c (e2m1, low nibble first) in a group with e8m0 scale s, i.e. FP4[c] * 2**(s - 127)
 * as transformers computes it in float32 (exact; 2**128 is inf). The bf16 table holds the same values (they
 * all fit bf16 exactly, subnormals included). */
EXPORTED __attribute__((aligned(64))) float mp_fp4_f32[256][16];
EXPORTED __attribute__((aligned(64))) uint16_t mp_fp4_bf16[256][16];

static const float FP4_VALUES[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

__attribute__((constructor)) static void mp_fill_tables(void) {
    for (int s = 0; s < 256; s++) {
        float factor = ldexpf(1.0f, s - 127); /* 2**-127 is a float32 subnormal (exact); 2**128 overflows to inf */
        for (int c = 0; c < 16; c++) {
            float v = FP4_VALUES[c] * factor;
            uint32_t bits;
            memcpy(&bits, &v, 4);
            mp_fp4_f32[s][c] = v;
            mp_fp4_bf16[s][c] = (uint16_t)(bits >> 16); /* exact: two significant bits */
        }
    }
}

EXPORTED int mp_abi_version(void) { return MP_ABI_VERSION; }

EXPORTED int mp_sizeof_layer(void) { return (int)sizeof(mp_layer); }

EXPORTED int mp_sizeof_call(void) { return (int)sizeof(mp_call); }

EXPORTED int mp_sizeof_attn(void) { return (int)sizeof(mp_attn); }
