/* moe-patch CPU expert kernels: routed experts computed straight from their stored bytes.
 *
 * This file is compiled once per instruction-set variant with different -m flags and MP_DOT:
 *   MP_DOT 1: AVX512_BF16  - weights decoded to bf16 in registers, vdpbf16ps (bf16 x bf16, fp32 accumulate)
 *   MP_DOT 2: AVX-512F/BW  - weights decoded to fp32, 16-lane FMA
 *   MP_DOT 3: AVX2+FMA+F16C - weights decoded to fp32, 8-lane FMA
 * and every exported symbol carries the variant's name (mp_run_avx512bf16, ...). Python picks the variant a
 * probe proved to run on this CPU (moe_patch/kernels/probe.py).
 *
 * Semantics (the same in every variant; moe_patch/kernels/README.md): in fp32 compute each weight is exactly
 * the project's torch decoders' float32 value (moe_patch/formats: fp8.py, mxfp4.py, compressed.py); in bf16
 * compute the decoders' bf16 value, except FP8 and symmetric integers, whose block/group scale multiplies each block's fp32 partial
 * sum (the exact product). Activations are held in the compute dtype, products summed in fp32. Outputs differ
 * between variants only in fp32 summation order and do not depend on the thread count (each output element is
 * summed by one thread, in a fixed order).
 *
 * One call computes a whole MoE layer for all tokens: routing slots are grouped by expert, the gate_up units
 * (expert x 16 gate/up pairs) and down units (16 output rows over every active expert) are spread over the
 * OpenMP threads of the runtime torch uses, and each weight row chunk is decoded once per call and used for
 * every row routed to its expert (from registers for up to 8 rows, through a per-thread L1/L2 buffer above).
 * No allocation: the caller passes a workspace of mp_workspace_* bytes. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "mp_common.h"

#ifndef MP_DOT
#error "compile with -DMP_DOT=1|2|3 and -DMP_VARIANT=name"
#endif

#define AI static inline __attribute__((always_inline))
#define NI static __attribute__((noinline))
#define PASTE2(a, b) a##_##b
#define PASTE(a, b) PASTE2(a, b)
#define VNAME(name) PASTE(name, MP_VARIANT)
#define EXPORT(name) __attribute__((visibility("default"))) VNAME(name)

extern float mp_fp4_f32[256][16];
extern uint16_t mp_fp4_bf16[256][16];

#define MR 4    /* weight rows per register tile */
#define JB 16   /* gate/up pairs per fused gate_up unit */
#define NB 32   /* stored rows per gate_up-only unit */
#define HB 16   /* down-projection rows per unit */
#define TCH 256 /* tokens per chunk inside a unit (bounds the per-thread buffers) */

/* ------------------------------------------------------------------ the vector layer of each variant */
#if MP_DOT == 1 || MP_DOT == 2
#define VL 16 /* fp32 lanes */
typedef __m512 vacc_t;
typedef __m512 vf_t;
typedef __m512i vi_t;
AI vacc_t acc_zero(void) { return _mm512_setzero_ps(); }
AI float hsum(vacc_t a) { return _mm512_reduce_add_ps(a); }
#define VF_LOAD _mm512_loadu_ps
#define VF_STORE _mm512_storeu_ps
#define VF_SET1 _mm512_set1_ps
#define VF_ADD _mm512_add_ps
#define VF_SUB _mm512_sub_ps
#define VF_MUL _mm512_mul_ps
#define VF_DIV _mm512_div_ps
#define VF_MIN _mm512_min_ps
#define VF_MAX _mm512_max_ps
#define VF_FMA _mm512_fmadd_ps
#define VF_RINT(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VF_TOI _mm512_cvtps_epi32
#define VF_SEL(cond_a, cond_b, pred, yes, no) _mm512_mask_blend_ps(_mm512_cmp_ps_mask(cond_a, cond_b, pred), no, yes)
#define VI_SET1 _mm512_set1_epi32
#define VI_ADD _mm512_add_epi32
#define VI_SLLI _mm512_slli_epi32
#define VI_ASF _mm512_castsi512_ps
#define VI_ASI _mm512_castps_si512
#define VI_AND _mm512_and_si512
#define VI_SRLI _mm512_srli_epi32
#endif

#if MP_DOT == 1
#define CK 32          /* weights per decoded chunk */
typedef uint16_t xe_t; /* activations and buffered weights: bf16 bits */
typedef __m512bh vw_t;
AI vw_t xload(const xe_t *p) { return (vw_t)_mm512_loadu_si512((const void *)p); }
AI void wstore(xe_t *p, vw_t w) { _mm512_storeu_si512((void *)p, (__m512i)w); }
AI vacc_t vdot(vacc_t a, vw_t w, vw_t x) { return _mm512_dpbf16_ps(a, w, x); }
#elif MP_DOT == 2
#define CK 16
typedef float xe_t;
typedef __m512 vw_t;
AI vw_t xload(const xe_t *p) { return _mm512_loadu_ps(p); }
AI void wstore(xe_t *p, vw_t w) { _mm512_storeu_ps(p, w); }
AI vacc_t vdot(vacc_t a, vw_t w, vw_t x) { return _mm512_fmadd_ps(w, x, a); }
#elif MP_DOT == 3
#define CK 8
#define VL 8
typedef float xe_t;
typedef __m256 vw_t;
typedef __m256 vacc_t;
typedef __m256 vf_t;
typedef __m256i vi_t;
AI vacc_t acc_zero(void) { return _mm256_setzero_ps(); }
AI vw_t xload(const xe_t *p) { return _mm256_loadu_ps(p); }
AI void wstore(xe_t *p, vw_t w) { _mm256_storeu_ps(p, w); }
AI vacc_t vdot(vacc_t a, vw_t w, vw_t x) { return _mm256_fmadd_ps(w, x, a); }
AI float hsum(vacc_t a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define VF_LOAD _mm256_loadu_ps
#define VF_STORE _mm256_storeu_ps
#define VF_SET1 _mm256_set1_ps
#define VF_ADD _mm256_add_ps
#define VF_SUB _mm256_sub_ps
#define VF_MUL _mm256_mul_ps
#define VF_DIV _mm256_div_ps
#define VF_MIN _mm256_min_ps
#define VF_MAX _mm256_max_ps
#define VF_FMA _mm256_fmadd_ps
#define VF_RINT(x) _mm256_round_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VF_TOI _mm256_cvtps_epi32
#define VF_SEL(cond_a, cond_b, pred, yes, no) _mm256_blendv_ps(no, yes, _mm256_cmp_ps(cond_a, cond_b, pred))
#define VI_SET1 _mm256_set1_epi32
#define VI_ADD _mm256_add_epi32
#define VI_SLLI _mm256_slli_epi32
#define VI_ASF _mm256_castsi256_ps
#define VI_ASI _mm256_castps_si256
#define VI_AND _mm256_and_si256
#define VI_SRLI _mm256_srli_epi32
#else
#error "unknown MP_DOT"
#endif

/* ------------------------------------------------------------------ scalar helpers */
AI float bits_f32(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
AI uint32_t f32_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

/* float -> bf16 bits, round to nearest even (as torch's conversion; NaN stays NaN) */
AI uint16_t bf16_rne(float f) {
    uint32_t b = f32_bits(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40u);
    b += 0x7fffu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}
AI float round_bf16(float f) { return bits_f32((uint32_t)bf16_rne(f) << 16); }

AI float ld_elem(const void *p, int64_t i, int dt) {
    switch (dt) {
    case MP_DT_BF16: return bits_f32((uint32_t)((const uint16_t *)p)[i] << 16);
    case MP_DT_F16: return _cvtsh_ss(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

AI void st_elem(void *p, int64_t i, int dt, float v) {
    switch (dt) {
    case MP_DT_BF16: ((uint16_t *)p)[i] = bf16_rne(v); break;
    case MP_DT_F16: ((uint16_t *)p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); break;
    default: ((float *)p)[i] = v;
    }
}

/* a scale as float32: e8m0 exponent bytes are 2**(b - 127) (b = 0: the subnormal 2**-127, 255: inf) */
AI float sload(const uint8_t *s, int64_t i, int dt) {
    switch (dt) {
    case MP_DT_E8M0: {
        uint32_t b = s[i];
        return bits_f32(b ? b << 23 : 0x00400000u);
    }
    case MP_DT_BF16: return bits_f32((uint32_t)((const uint16_t *)s)[i] << 16);
    case MP_DT_F16: return _cvtsh_ss(((const uint16_t *)s)[i]);
    default: return ((const float *)s)[i];
    }
}

AI int sdt_size(int dt) { return dt == MP_DT_F32 ? 4 : dt == MP_DT_E8M0 ? 1 : 2; }

/* an activation element in the compute format */
AI xe_t to_xe(float v, int rb) {
#if MP_DOT == 1
    (void)rb;
    return bf16_rne(v);
#else
    return rb ? round_bf16(v) : v;
#endif
}

/* bytes of the stored row up to element k (4-bit formats hold two per byte) */
AI int64_t boff(const int F, int64_t k) {
    switch (F) {
    case MP_W_BF16:
    case MP_W_F16: return 2 * k;
    case MP_W_F32: return 4 * k;
    case MP_W_MXFP4:
    case MP_W_INT4: return k >> 1;
    default: return k;
    }
}

/* ------------------------------------------------------------------ row cursors and chunk decoders */
/* Internal kinds: the stored format, with integer formats split by whether they carry zero points (the
 * symmetric ones are block-scaled on the bf16 variant). */
enum { K_BF16 = 1, K_F16 = 2, K_F32 = 3, K_FP8 = 4, K_MXFP4 = 5, K_INT4 = 6, K_INT8 = 7, K_INT4S = 8, K_INT8S = 9 };

/* Block-scaled kinds: decoded without their scale, which multiplies each scale block's partial dot in fp32
 * (the exact product fp8 * s or q * s, as DeepSeek's FP8 GEMMs apply block scales). Only on the bf16 variant:
 * the fp32 variants form the same products per weight in fp32. */
AI int is_blk(const int F) {
#if MP_DOT == 1
    return F == K_FP8 || F == K_INT4S || F == K_INT8S;
#else
    (void)F;
    return 0;
#endif
}

typedef struct {
    const uint8_t *w; /* the stored row */
    const uint8_t *s; /* its scale row */
    const uint8_t *z; /* its zero-point word row */
    int zshift;       /* bit offset of this row's zero point in those words */
#if MP_DOT == 1
    __m512i tab; /* INT4 with zero points: bf16 value of each code in the current group */
#elif MP_DOT == 2
    __m512 tab;
#else
    __m256 tlo, thi;
    __m256 grp[4]; /* MXFP4: the current group of 32, decoded at its first chunk */
#endif
} cur_t;

AI void cur_init(cur_t *c, const mp_proj *P, const int64_t *ep, int n) {
    if (P->split && n >= P->split) { /* the second stored part (only gate_up splits: ep is the expert's row) */
        n -= P->split;
        ep += MP_UP_W;
    }
    c->w = (const uint8_t *)(uintptr_t)ep[0] + (int64_t)n * P->wrow_bytes;
    c->s = ep[1] ? (const uint8_t *)(uintptr_t)ep[1] + (int64_t)(n / P->b0) * P->scols * sdt_size(P->sdtype) : NULL;
    c->z = NULL;
    c->zshift = 0;
#if MP_DOT == 1
    c->tab = _mm512_setzero_si512();
#elif MP_DOT == 2
    c->tab = _mm512_setzero_ps();
#else
    c->tlo = c->thi = c->grp[0] = c->grp[1] = c->grp[2] = c->grp[3] = _mm256_setzero_ps();
#endif
    if (P->has_zp) {
        int per = 32 / P->bits;
        c->z = (const uint8_t *)(uintptr_t)ep[2] + (int64_t)(n / per) * P->scols * 4;
        c->zshift = (n % per) * P->bits;
    }
}

/* zero-point code (stored value + 2**(bits-1)) of group g */
AI int zcode(const cur_t *c, int g, int bits) {
    return (int)((((const uint32_t *)c->z)[g] >> c->zshift) & ((1u << bits) - 1u));
}

/* the offset the integer decoders subtract: the zero-point code, or 2**(bits-1) without zero points */
AI float zoff(const cur_t *c, const mp_proj *P, int g) {
    return P->has_zp ? (float)zcode(c, g, P->bits) : (float)(1 << (P->bits - 1));
}

AI int group_start(const mp_proj *P, int k0) { return (k0 & ((1u << P->b1_shift) - 1u)) == 0; }

#if MP_DOT != 1
/* round fp32 lanes to bf16 precision (nearest even), kept as fp32: the compute-bf16 semantics on FMA variants */
AI vw_t vround_bf16(vw_t v) {
    vi_t b = VI_ASI(v);
    vi_t lsb = VI_AND(VI_SRLI(b, 16), VI_SET1(1));
    b = VI_ADD(b, VI_ADD(lsb, VI_SET1(0x7fff)));
    return VI_ASF(VI_AND(b, VI_SET1((int)0xffff0000u)));
}
#endif

/* Integer weights: (q - zero) * scale as compressed-tensors computes it in the scale's dtype (a float32 product
 * of these short significands is exact, one rounding gives torch's result), or, block-scaled / exact with rb on
 * the fp32 variants for symmetric kinds, the exact product. */
AI int int_rounds(const int F, int rb) { return !((F == K_INT4S || F == K_INT8S) && rb); }

#if MP_DOT == 1
/* ---- AVX512_BF16: chunks of 32 weights as bf16 */
AI __m512 f16_round(__m512 v) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* nibble codes of 16 bytes as 32 words in element order (low nibble first) */
AI __m512i nibbles32(const uint8_t *p) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
}

/* INT4 with zero points: the group's 16 values, rounded as the decoder does, as bf16 */
AI void int4_table(cur_t *c, const mp_proj *P, int g) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 t = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zoff(c, P, g))),
                             _mm512_set1_ps(sload(c->s, g, P->sdtype)));
    if (P->sdtype == MP_DT_F16) t = f16_round(t);
    c->tab = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(t));
}

/* FP8 e4m3 -> the exact value as bf16 bits: sign, exponent rebased from 7 to 127 (+120), mantissa; exponent-0
 * codes (zero and subnormals m * 2**-9) from a table. NaN codes read as 480, as in the torch decoder. */
AI __m512i fp8_bf16(const uint8_t *p) {
    const __m512i sub_values = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                0x3C60, 0x3C40, 0x3C20, 0x3C00, 0x3BC0, 0x3B80, 0x3B00, 0);
    __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
    __m512i n = _mm512_add_epi16(_mm512_and_si512(_mm512_slli_epi16(w, 4), _mm512_set1_epi16((short)0x87F0)),
                                 _mm512_set1_epi16(0x3C00));
    __mmask32 sub = _mm512_testn_epi16_mask(w, _mm512_set1_epi16(0x0078));
    __m512i sv = _mm512_ternarylogic_epi32(_mm512_permutexvar_epi16(w, sub_values), w,
                                           _mm512_set1_epi16((short)0x8000), 0xF8); /* table | (w & sign) */
    return _mm512_mask_blend_epi16(sub, n, sv);
}

/* chunk k0 .. k0+31 of the row as bf16 (block-scaled kinds: without their scale) */
AI vw_t dec(const int F, const int RB, cur_t *c, const mp_proj *P, int k0) {
    (void)RB;
    const uint8_t *p = c->w + boff(F == K_INT4S ? K_INT4 : F == K_INT8S ? K_INT8 : F, k0);
    switch (F) {
    case K_BF16: return (vw_t)_mm512_loadu_si512((const void *)p);
    case K_F16: {
        __m512 lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        __m512 hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)));
        return _mm512_cvtne2ps_pbh(hi, lo);
    }
    case K_F32: return _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 64), _mm512_loadu_ps(p));
    case K_FP8: return (vw_t)fp8_bf16(p);
    case K_MXFP4: {
        __m512i tab = _mm512_castsi256_si512(_mm256_load_si256((const __m256i *)mp_fp4_bf16[c->s[k0 >> 5]]));
        return (vw_t)_mm512_permutexvar_epi16(nibbles32(p), tab);
    }
    case K_INT4S: { /* q - 8 as bf16 (exact) */
        const __m512i q8 = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x40E0, 0x40C0, 0x40A0,
                                            0x4080, 0x4040, 0x4000, 0x3F80, 0, (short)0xBF80, (short)0xC000,
                                            (short)0xC040, (short)0xC080, (short)0xC0A0, (short)0xC0C0,
                                            (short)0xC0E0, (short)0xC100);
        return (vw_t)_mm512_permutexvar_epi16(nibbles32(p), q8);
    }
    case K_INT4:
        if (group_start(P, k0)) int4_table(c, P, k0 >> P->b1_shift);
        return (vw_t)_mm512_permutexvar_epi16(nibbles32(p), c->tab);
    case K_INT8S: { /* q = byte - 128, exact in bf16 */
        __m256i b = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)p), _mm256_set1_epi8((char)0x80));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
        return _mm512_cvtne2ps_pbh(hi, lo);
    }
    default: { /* K_INT8 with zero points */
        __m256i b = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)p), _mm256_set1_epi8((char)0x80));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
        int g = k0 >> P->b1_shift;
        __m512 z = _mm512_set1_ps(zoff(c, P, g) - 128.0f), s = _mm512_set1_ps(sload(c->s, g, P->sdtype));
        lo = _mm512_mul_ps(_mm512_sub_ps(lo, z), s);
        hi = _mm512_mul_ps(_mm512_sub_ps(hi, z), s);
        if (P->sdtype == MP_DT_F16) {
            lo = f16_round(lo);
            hi = f16_round(hi);
        }
        return _mm512_cvtne2ps_pbh(hi, lo);
    }
    }
}

#elif MP_DOT == 2
/* ---- AVX-512F: chunks of 16 weights as fp32 */
AI __m512 f16_round(__m512 v) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* nibble codes of 8 bytes as 16 dwords in element order */
AI __m512i nibbles16(const uint8_t *p) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i w = _mm256_and_si256(_mm256_or_si256(b, _mm256_slli_epi32(b, 12)), _mm256_set1_epi32(0x000F000F));
    return _mm512_cvtepu16_epi32(w);
}

AI void int4_table(const int F, cur_t *c, const mp_proj *P, int g, int rb) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 t = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zoff(c, P, g))),
                             _mm512_set1_ps(sload(c->s, g, P->sdtype)));
    if (int_rounds(F, rb)) {
        if (P->sdtype == MP_DT_F16) t = f16_round(t);
        if (P->sdtype == MP_DT_BF16 || rb) t = vround_bf16(t);
    }
    c->tab = t;
}

/* FP8 e4m3 -> fp32 bits of value * 2**-120 (exponent field = e4m3's, subnormals become fp32 subnormals), then
 * times scale * 2**120: the exact product rounded once, as the decoder's fp32 product */
AI __m512 fp8_scaled16(const uint8_t *p, float s) {
    __m512i d = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512 v = _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(d, 20), _mm512_set1_epi32((int)0x87F00000u)));
    if (__builtin_expect(fabsf(s) < 0x1p7f, 1)) return _mm512_mul_ps(v, _mm512_set1_ps(s * 0x1p120f));
    return _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0x1p120f)), _mm512_set1_ps(s));
}

AI vw_t dec(const int F, const int RB, cur_t *c, const mp_proj *P, int k0) {
    const uint8_t *p = c->w + boff(F == K_INT4S ? K_INT4 : F == K_INT8S ? K_INT8 : F, k0);
    switch (F) {
    case K_BF16:
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    case K_F16: {
        __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        return RB ? vround_bf16(v) : v;
    }
    case K_F32: {
        __m512 v = _mm512_loadu_ps(p);
        return RB ? vround_bf16(v) : v;
    }
    case K_FP8: return fp8_scaled16(p, sload(c->s, k0 >> P->b1_shift, P->sdtype));
    case K_MXFP4: return _mm512_permutexvar_ps(nibbles16(p), _mm512_load_ps(mp_fp4_f32[c->s[k0 >> 5]]));
    case K_INT4:
    case K_INT4S:
        if (group_start(P, k0)) int4_table(F, c, P, k0 >> P->b1_shift, RB);
        return _mm512_permutexvar_ps(nibbles16(p), c->tab);
    default: { /* K_INT8, K_INT8S */
        __m128i b = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_set1_epi8((char)0x80));
        __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        int g = k0 >> P->b1_shift;
        if (P->has_zp) v = _mm512_sub_ps(v, _mm512_set1_ps((float)(zcode(c, g, 8) - 128)));
        v = _mm512_mul_ps(v, _mm512_set1_ps(sload(c->s, g, P->sdtype)));
        if (int_rounds(F, RB)) {
            if (P->sdtype == MP_DT_F16) v = f16_round(v);
            if (P->sdtype == MP_DT_BF16 || RB) v = vround_bf16(v);
        }
        return v;
    }
    }
}

#else
/* ---- AVX2: chunks of 8 weights as fp32 */
AI __m256 f16_round8(__m256 v) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

AI void int4_table(const int F, cur_t *c, const mp_proj *P, int g, int rb) {
    const __m256 s = _mm256_set1_ps(sload(c->s, g, P->sdtype)), z = _mm256_set1_ps(zoff(c, P, g));
    const __m256 iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 lo = _mm256_mul_ps(_mm256_sub_ps(iota, z), s);
    __m256 hi = _mm256_mul_ps(_mm256_sub_ps(_mm256_add_ps(iota, _mm256_set1_ps(8.0f)), z), s);
    if (int_rounds(F, rb)) {
        if (P->sdtype == MP_DT_F16) {
            lo = f16_round8(lo);
            hi = f16_round8(hi);
        }
        if (P->sdtype == MP_DT_BF16 || rb) {
            lo = vround_bf16(lo);
            hi = vround_bf16(hi);
        }
    }
    c->tlo = lo;
    c->thi = hi;
}

/* nibble codes of 4 bytes as 8 dwords in element order */
AI __m256i nibbles8(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    __m128i b = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(v));
    __m128i w = _mm_and_si128(_mm_or_si128(b, _mm_slli_epi32(b, 12)), _mm_set1_epi32(0x000F000F));
    return _mm256_cvtepu16_epi32(w);
}

/* MXFP4 group of 32 (16 bytes) at once: nibbles to bytes in element order, pshufb to twice the e2m1 value
 * (integers -12..12), to fp32, times 2**(scale - 128): exact (the decoder's value; +0 for the code of -0) */
AI void mxfp4_group8(cur_t *c, const uint8_t *p, int s) {
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
    __m128i v0 = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi));
    __m128i v1 = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(lo, hi));
    const __m256 f = _mm256_set1_ps(mp_fp4_f32[s][2] * 0.5f); /* 2**(s-127) / 2, exact (s = 255: inf) */
    c->grp[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0)), f);
    c->grp[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8))), f);
    c->grp[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1)), f);
    c->grp[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8))), f);
}

AI __m256 fp8_scaled8(const uint8_t *p, float s) {
    __m256i d = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256 v = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(d, 20), _mm256_set1_epi32((int)0x87F00000u)));
    if (__builtin_expect(fabsf(s) < 0x1p7f, 1)) return _mm256_mul_ps(v, _mm256_set1_ps(s * 0x1p120f));
    return _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(0x1p120f)), _mm256_set1_ps(s));
}

AI vw_t dec(const int F, const int RB, cur_t *c, const mp_proj *P, int k0) {
    const uint8_t *p = c->w + boff(F == K_INT4S ? K_INT4 : F == K_INT8S ? K_INT8 : F, k0);
    switch (F) {
    case K_BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    case K_F16: {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        return RB ? vround_bf16(v) : v;
    }
    case K_F32: {
        __m256 v = _mm256_loadu_ps((const float *)p);
        return RB ? vround_bf16(v) : v;
    }
    case K_FP8: return fp8_scaled8(p, sload(c->s, k0 >> P->b1_shift, P->sdtype));
    case K_MXFP4:
        if ((k0 & 31) == 0) mxfp4_group8(c, p, c->s[k0 >> 5]);
        return c->grp[(k0 >> 3) & 3];
    case K_INT4:
    case K_INT4S: {
        if (group_start(P, k0)) int4_table(F, c, P, k0 >> P->b1_shift, RB);
        __m256i idx = nibbles8(p);
        return _mm256_blendv_ps(_mm256_permutevar8x32_ps(c->tlo, idx), _mm256_permutevar8x32_ps(c->thi, idx),
                                _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    }
    default: { /* K_INT8, K_INT8S */
        __m128i b = _mm_xor_si128(_mm_loadl_epi64((const __m128i *)p), _mm_set1_epi8((char)0x80));
        __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        int g = k0 >> P->b1_shift;
        if (P->has_zp) v = _mm256_sub_ps(v, _mm256_set1_ps((float)(zcode(c, g, 8) - 128)));
        v = _mm256_mul_ps(v, _mm256_set1_ps(sload(c->s, g, P->sdtype)));
        if (int_rounds(F, RB)) {
            if (P->sdtype == MP_DT_F16) v = f16_round8(v);
            if (P->sdtype == MP_DT_BF16 || RB) v = vround_bf16(v);
        }
        return v;
    }
    }
}
#endif

/* the scale of block b of a block-scaled row */
AI float bscale(const cur_t *c, const mp_proj *P, int b) { return sload(c->s, b, P->sdtype); }

/* the n block scales of a row as float32 (the dtype switch outside the loop) */
AI void load_scales(float *dst, const uint8_t *s, int n, int dt) {
    switch (dt) {
    case MP_DT_F32: memcpy(dst, s, (size_t)n * 4); break;
    case MP_DT_BF16:
        for (int i = 0; i < n; i++) dst[i] = bits_f32((uint32_t)((const uint16_t *)s)[i] << 16);
        break;
    case MP_DT_F16:
        for (int i = 0; i < n; i++) dst[i] = _cvtsh_ss(((const uint16_t *)s)[i]);
        break;
    default:
        for (int i = 0; i < n; i++) dst[i] = sload(s, i, MP_DT_E8M0);
    }
}

/* The last, partial chunk (K not a multiple of CK): decoded from a zero-padded copy, so nothing past the row is
 * read; the padding decodes to finite values that meet zero activations. */
AI vw_t dec_tail(const int F, const int RB, cur_t *c, const mp_proj *P, int k0, int K) {
    const int bf = F == K_INT4S ? K_INT4 : F == K_INT8S ? K_INT8 : F;
    uint8_t tmp[CK * 4] __attribute__((aligned(64)));
    memset(tmp, 0, sizeof tmp);
    int64_t off = boff(bf, k0);
    int64_t end = (bf == K_MXFP4 || bf == K_INT4) ? ((int64_t)K + 1) >> 1 : boff(bf, K);
    memcpy(tmp, c->w + off, (size_t)(end - off));
    cur_t t = *c;
    t.w = (const uint8_t *)((uintptr_t)tmp - (uintptr_t)off);
    vw_t v = dec(F, RB, &t, P, k0);
#if MP_DOT == 1
    c->tab = t.tab;
#elif MP_DOT == 2
    c->tab = t.tab;
#else
    c->tlo = t.tlo;
    c->thi = t.thi;
#endif
    return v;
}

/* ------------------------------------------------------------------ tiles: MRt weight rows x RT tokens */
/* Prefetch the rows the next tile will read (the MRt rows after this tile's, where the weights of a unit lie),
 * linearly, at the pace this tile reads its own: the lines in [off, off + n) of the region at pf. Several rows
 * read side by side from DRAM stream poorly on their own (one EPYC core: 5.4 GB/s for 4 interleaved MXFP4
 * rows); with the next tile fetched ahead into L1 they stream at 14.9 GB/s, as one row at a time does.
 * far (NULL: none): the same lines of the tile three ahead, into L2, so the next tile's fetch into L1 finds them on
 * the core (measured, alternating builds, 1 token: FP8 +13-22%, MXFP4 +5-7%; bf16 at 4 tokens +27%). */
AI void prefetch_next(const uint8_t *pf, const uint8_t *far, int64_t off, int64_t n) {
    const int64_t first = (off + 63) & ~(int64_t)63;
    for (int64_t line = first; line < off + n; line += 64) _mm_prefetch((const char *)pf + line, _MM_HINT_T0);
    if (far)
        for (int64_t line = first; line < off + n; line += 64) _mm_prefetch((const char *)far + line, _MM_HINT_T1);
}
/* the stored-byte layout of a kind (the symmetric integer kinds are stored as the others) */
AI int kind_bytes(const int F) { return F == K_INT4S ? K_INT4 : F == K_INT8S ? K_INT8 : F; }

/* rows per register tile for RT tokens (accumulators must stay in registers: 32 zmm, or 16 ymm on AVX2) */
AI int tile_rows(const int BLK, const int RT) {
#if MP_DOT == 3
    (void)BLK;
    return RT <= 2 ? 4 : RT <= 4 ? 2 : 1;
#else
    if (BLK) return RT <= 2 ? 4 : RT <= 4 ? 2 : 1;
    return RT <= 4 ? 4 : 2;
#endif
}

/* res[r * ldr + m] = row m . token r for MRt rows and RT tokens, each chunk of the rows decoded once. Block-scaled
 * kinds sum each scale block into t and add t * scale (bsc [MRt][nb], the rows' block scales) to the result. */
AI void tile_reg_pc(const int F, const int RB, const int MRt, const int RT, const int per_chunk, const mp_proj *P,
                    cur_t *cur, const xe_t *const *xr, float *res, int ldr, const float *bsc, int nb) {
    const int K = P->cols, BLK = is_blk(F);
    const uint8_t *pf = cur[0].w + (int64_t)MRt * P->wrow_bytes; /* the next tile's rows (consecutive rows) */
    const int bs = BLK ? (P->b1_shift >= 30 ? K : 1 << P->b1_shift) : K;
    vacc_t acc[4][8]; /* fixed bounds (not VLAs): unrolled, they live in registers */
#pragma GCC unroll 4
    for (int m = 0; m < MRt; m++)
#pragma GCC unroll 8
        for (int r = 0; r < RT; r++) acc[m][r] = acc_zero();
    /* one chunk: decode the MRt rows (TAIL: the row's last, partial chunk), multiply with the RT tokens into t
     * (block-scaled) or straight into acc */
#define CHUNK(TAIL)                                                                                                \
    do {                                                                                                           \
        vw_t w[4];                                                                                                 \
        if (!TAIL)                                                                                                 \
            prefetch_next(pf, pf + 2 * MRt * P->wrow_bytes, MRt * boff(kind_bytes(F), k0),                         \
                          MRt * boff(kind_bytes(F), CK));                                                          \
        _Pragma("GCC unroll 4") for (int m = 0; m < MRt; m++) w[m] =                                               \
            TAIL ? dec_tail(F, RB, &cur[m], P, k0, K) : dec(F, RB, &cur[m], P, k0);                                \
        _Pragma("GCC unroll 8") for (int r = 0; r < RT; r++) {                                                     \
            vw_t xv = xload(xr[r] + k0);                                                                           \
            _Pragma("GCC unroll 4") for (int m = 0; m < MRt; m++) {                                                \
                if (!BLK)                                                                                          \
                    acc[m][r] = vdot(acc[m][r], w[m], xv);                                                         \
                else if (per_chunk)                                                                                \
                    acc[m][r] = VF_FMA(vdot(acc_zero(), w[m], xv), VF_SET1(bsc[m * nb + b]), acc[m][r]);           \
                else                                                                                               \
                    t[m][r] = vdot(t[m][r], w[m], xv);                                                             \
            }                                                                                                      \
        }                                                                                                          \
    } while (0)
    const int step = per_chunk ? K : bs;
    for (int kb = 0, bb = 0; kb < K; kb += step, bb++) {
        const int kend = kb + step < K ? kb + step : K;
        vacc_t t[4][8];
#pragma GCC unroll 4
        for (int m = 0; m < MRt; m++)
#pragma GCC unroll 8
            for (int r = 0; r < RT; r++) t[m][r] = acc_zero(); /* dead unless block-scaled */
        int k0 = kb, b = per_chunk ? 0 : bb;
        for (; k0 + CK <= kend; k0 += CK, b += per_chunk) CHUNK(0);
        if (k0 < kend) CHUNK(1); /* only at the row's end: blocks are whole chunks */
        if (BLK && !per_chunk) {
#pragma GCC unroll 4
            for (int m = 0; m < MRt; m++) {
                const vf_t vs = VF_SET1(bsc[m * nb + bb]);
#pragma GCC unroll 8
                for (int r = 0; r < RT; r++) acc[m][r] = VF_FMA(t[m][r], vs, acc[m][r]);
            }
        }
    }
#undef CHUNK
#pragma GCC unroll 8
    for (int r = 0; r < RT; r++)
#pragma GCC unroll 4
        for (int m = 0; m < MRt; m++) res[r * ldr + m] = hsum(acc[m][r]);
}

/* per_chunk (a scale per chunk, INT4 groups of 32: no block loop) as a compile-time branch of its own */
AI void tile_reg(const int F, const int RB, const int MRt, const int RT, const mp_proj *P, cur_t *cur,
                 const xe_t *const *xr, float *res, int ldr, const float *bsc, int nb) {
    if (is_blk(F) && (1 << P->b1_shift) == CK)
        tile_reg_pc(F, RB, MRt, RT, 1, P, cur, xr, res, ldr, bsc, nb);
    else
        tile_reg_pc(F, RB, MRt, RT, 0, P, cur, xr, res, ldr, bsc, nb);
}

/* One row at a time for 1 or 2 tokens (one x load per dot costs nothing there), its chunks spread over KS
 * accumulators for latency, the next row prefetched. bsc: the row's block scales. */
AI void tile_seq(const int F, const int RB, const int RT, const int KS, const int per_chunk, const mp_proj *P,
                 cur_t *c, const xe_t *const *xr, float *res, const float *bsc) {
    const int K = P->cols, BLK = is_blk(F);
    const int bs = BLK && !per_chunk ? (P->b1_shift >= 30 ? K : 1 << P->b1_shift) : K;
    vacc_t acc[4][2];
#pragma GCC unroll 4
    for (int j = 0; j < KS; j++)
#pragma GCC unroll 2
        for (int r = 0; r < RT; r++) acc[j][r] = acc_zero();
    /* chunk kj into accumulator j (TAIL: the row's last, partial chunk) */
#define SEQ_CHUNK(j, kj, TAIL)                                                                                     \
    do {                                                                                                           \
        if (!TAIL) prefetch_next(c->w + P->wrow_bytes, NULL, boff(kind_bytes(F), kj), boff(kind_bytes(F), CK)); \
        const vw_t w = TAIL ? dec_tail(F, RB, c, P, kj, K) : dec(F, RB, c, P, kj);                                 \
        _Pragma("GCC unroll 2") for (int r = 0; r < RT; r++) {                                                     \
            const vw_t xv = xload(xr[r] + (kj));                                                                   \
            if (!BLK)                                                                                              \
                acc[j][r] = vdot(acc[j][r], w, xv);                                                                \
            else if (per_chunk)                                                                                    \
                acc[j][r] = VF_FMA(vdot(acc_zero(), w, xv), VF_SET1(bsc[(kj) >> 5]), acc[j][r]);                   \
            else                                                                                                   \
                t[j][r] = vdot(t[j][r], w, xv);                                                                    \
        }                                                                                                          \
    } while (0)
    for (int kb = 0, b = 0; kb < K; kb += bs, b++) {
        const int kend = kb + bs < K ? kb + bs : K;
        vacc_t t[4][2];
#pragma GCC unroll 4
        for (int j = 0; j < KS; j++)
#pragma GCC unroll 2
            for (int r = 0; r < RT; r++) t[j][r] = acc_zero(); /* dead unless block-scaled */
        int k0 = kb;
        for (; k0 + KS * CK <= kend; k0 += KS * CK) {
#pragma GCC unroll 4
            for (int j = 0; j < KS; j++) SEQ_CHUNK(j, k0 + j * CK, 0);
        }
        for (; k0 + CK <= kend; k0 += CK) SEQ_CHUNK(0, k0, 0);
        if (k0 < kend) SEQ_CHUNK(0, k0, 1); /* only at the row's end: blocks are whole chunks */
        if (BLK && !per_chunk) {
            const vf_t vs = VF_SET1(bsc[b]);
#pragma GCC unroll 4
            for (int j = 0; j < KS; j++)
#pragma GCC unroll 2
                for (int r = 0; r < RT; r++) acc[j][r] = VF_FMA(t[j][r], vs, acc[j][r]);
        }
    }
#undef SEQ_CHUNK
#pragma GCC unroll 2
    for (int r = 0; r < RT; r++) {
        vacc_t sum = acc[0][r];
#pragma GCC unroll 4
        for (int j = 1; j < KS; j++) sum = VF_ADD(sum, acc[j][r]);
        res[r] = hsum(sum);
    }
}

/* the MR rows decoded once into buf [MR][Kp] (compute format, zero-padded tail); block scales into bsc [MR][nb] */
AI void decode_rows(const int F, const int RB, const mp_proj *P, cur_t *cur, xe_t *buf, int Kp, float *bsc,
                    int nb) {
    const int K = P->cols;
    for (int m = 0; m < MR; m++) {
        int k0 = 0;
        for (; k0 + CK <= K; k0 += CK) wstore(buf + (int64_t)m * Kp + k0, dec(F, RB, &cur[m], P, k0));
        if (k0 < K) wstore(buf + (int64_t)m * Kp + k0, dec_tail(F, RB, &cur[m], P, k0, K));
        if (is_blk(F)) load_scales(bsc + m * nb, cur[m].s, nb, P->sdtype);
    }
}

AI void tile_buf(const int BLK, const int RT, const xe_t *buf, int Kp, const float *bsc, int nb, int bs,
                 const xe_t *const *xr, float *res, int ldr) {
    vacc_t acc[MR][8];
#pragma GCC unroll 4
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 8
        for (int r = 0; r < RT; r++) acc[m][r] = acc_zero();
    const int step = BLK ? bs : Kp;
    for (int kb = 0, b = 0; kb < Kp; kb += step, b++) {
        const int kend = kb + step < Kp ? kb + step : Kp;
        vacc_t t[MR][8];
#pragma GCC unroll 4
        for (int m = 0; m < MR; m++)
#pragma GCC unroll 8
            for (int r = 0; r < RT; r++) t[m][r] = acc_zero();
        for (int k0 = kb; k0 < kend; k0 += CK) {
            vw_t w[MR];
#pragma GCC unroll 4
            for (int m = 0; m < MR; m++) w[m] = xload(buf + (int64_t)m * Kp + k0);
#pragma GCC unroll 8
            for (int r = 0; r < RT; r++) {
                vw_t xv = xload(xr[r] + k0);
#pragma GCC unroll 4
                for (int m = 0; m < MR; m++) t[m][r] = vdot(t[m][r], w[m], xv);
            }
        }
#pragma GCC unroll 4
        for (int m = 0; m < MR; m++) {
            const vf_t vs = VF_SET1(BLK ? bsc[m * nb + b] : 1.0f);
#pragma GCC unroll 8
            for (int r = 0; r < RT; r++) acc[m][r] = BLK ? VF_FMA(t[m][r], vs, acc[m][r]) : t[m][r];
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RT; r++)
#pragma GCC unroll 4
        for (int m = 0; m < MR; m++) res[r * ldr + m] = hsum(acc[m][r]);
}

#if MP_DOT == 3
#define RTB 2
#define RTB_BLK 2
#else
#define RTB 6
#define RTB_BLK 3
#endif

NI void tile_buf_any(int blk, int rt, const xe_t *buf, int Kp, const float *bsc, int nb, int bs,
                     const xe_t *const *xr, float *res, int ldr) {
#define TB(B, R) tile_buf(B, R, buf, Kp, bsc, nb, bs, xr, res, ldr)
    if (blk) {
        switch (rt) {
        case 1: TB(1, 1); break;
        case 2: TB(1, 2); break;
#if RTB_BLK > 2
        case 3: TB(1, 3); break;
#endif
        }
    } else {
        switch (rt) {
        case 1: TB(0, 1); break;
        case 2: TB(0, 2); break;
#if RTB > 2
        case 3: TB(0, 3); break;
        case 4: TB(0, 4); break;
        case 5: TB(0, 5); break;
        case 6: TB(0, 6); break;
#endif
        }
    }
#undef TB
}

/* register tiles over all rows for RT tokens */
AI void rows_reg(const int F, const int RB, const int RT, const mp_proj *P, const int64_t *ep, const int *rows,
                 int nrows, const xe_t *const *xr, float *res, float *bsc) {
    enum { MRT = 4 };
    const int MRt = tile_rows(is_blk(F), RT), K = P->cols;
    const int nb = is_blk(F) ? (P->b1_shift >= 30 ? 1 : (K + (1 << P->b1_shift) - 1) >> P->b1_shift) : 0;
    float tmp[MRT * 8];
    /* Stored floats at 2 tokens and below stream one row at a time. A decoded kind at one token takes the register
     * tiles (four rows, the next tile prefetched): each row's decode chain overlaps the others' and each token
     * load serves four rows (measured, alternating builds, Qwen3 and gpt-oss layers: MXFP4 +7-9%, FP8 +4%;
     * bf16 streamed 13% slower that way). */
    if (RT == 2 || (RT == 1 && (F == K_BF16 || F == K_F16 || F == K_F32))) {
        const int KS = RT == 1 ? 4 : 2, pc = is_blk(F) && (1 << P->b1_shift) == CK;
        for (int i = 0; i < nrows; i++) {
            cur_t c;
            cur_init(&c, P, ep, rows[i]);
            if (is_blk(F)) load_scales(bsc, c.s, nb, P->sdtype);
            if (pc)
                tile_seq(F, RB, RT, KS, 1, P, &c, xr, tmp, bsc);
            else
                tile_seq(F, RB, RT, KS, 0, P, &c, xr, tmp, bsc);
            for (int r = 0; r < RT; r++) res[r * nrows + i] = tmp[r];
        }
        return;
    }
    for (int i0 = 0; i0 < nrows; i0 += MRt) {
        cur_t cur[MRT];
        const int mv = nrows - i0 < MRt ? nrows - i0 : MRt;
        for (int m = 0; m < MRt; m++) {
            cur_init(&cur[m], P, ep, rows[i0 + (m < mv ? m : mv - 1)]);
            if (is_blk(F)) load_scales(bsc + m * nb, cur[m].s, nb, P->sdtype);
        }
        if (MRt == 4)
            tile_reg(F, RB, 4, RT, P, cur, xr, tmp, 4, bsc, nb);
        else if (MRt == 2)
            tile_reg(F, RB, 2, RT, P, cur, xr, tmp, 2, bsc, nb);
        else
            tile_reg(F, RB, 1, RT, P, cur, xr, tmp, 1, bsc, nb);
        for (int r = 0; r < RT; r++)
            for (int m = 0; m < mv; m++) res[r * nrows + i0 + m] = tmp[r * MRt + m];
    }
}

/* res[r * nrows + i] = stored row rows[i] . x row xr[r] for i < nrows, r < R (R <= TCH): up to 8 tokens from
 * registers, more through buf (the rows decoded once per call into L1/L2, then a register-tiled product) */
AI void rows_compute(const int F, const int RB, const mp_proj *P, const int64_t *ep, const int *rows, int nrows,
                     int R, const xe_t *const *xr, float *res, xe_t *buf, int Kp, float *bsc) {
    switch (R) {
    case 1: rows_reg(F, RB, 1, P, ep, rows, nrows, xr, res, bsc); return;
    case 2: rows_reg(F, RB, 2, P, ep, rows, nrows, xr, res, bsc); return;
    case 3: rows_reg(F, RB, 3, P, ep, rows, nrows, xr, res, bsc); return;
    case 4: rows_reg(F, RB, 4, P, ep, rows, nrows, xr, res, bsc); return;
    case 5: rows_reg(F, RB, 5, P, ep, rows, nrows, xr, res, bsc); return;
    case 6: rows_reg(F, RB, 6, P, ep, rows, nrows, xr, res, bsc); return;
    case 7: rows_reg(F, RB, 7, P, ep, rows, nrows, xr, res, bsc); return;
    case 8: rows_reg(F, RB, 8, P, ep, rows, nrows, xr, res, bsc); return;
    }
    const int BLK = is_blk(F), K = P->cols;
    const int bs = BLK ? (P->b1_shift >= 30 ? Kp : 1 << P->b1_shift) : Kp;
    const int nb = BLK ? (K + bs - 1) / bs : 1, rtb = BLK ? RTB_BLK : RTB;
    float tmp[MR * RTB];
    for (int i0 = 0; i0 < nrows; i0 += MR) {
        cur_t cur[MR];
        const int mv = nrows - i0 < MR ? nrows - i0 : MR;
        for (int m = 0; m < MR; m++) cur_init(&cur[m], P, ep, rows[i0 + (m < mv ? m : mv - 1)]);
        decode_rows(F, RB, P, cur, buf, Kp, bsc, nb);
        for (int r0 = 0; r0 < R; r0 += rtb) {
            const int rt = R - r0 < rtb ? R - r0 : rtb;
            tile_buf_any(BLK, rt, buf, Kp, bsc, nb, bs, xr + r0, tmp, MR);
            for (int r = 0; r < rt; r++)
                for (int m = 0; m < mv; m++) res[(r0 + r) * nrows + i0 + m] = tmp[r * MR + m];
        }
    }
}

/* one instance per kind; RB (compute in bf16) is a run-time flag on the fp32 variants */
#define ROWS_FN(F, RB, name)                                                                                    \
    NI void name(const mp_proj *P, const int64_t *ep, const int *rows, int nrows, int R, const xe_t *const *xr, \
                 float *res, xe_t *buf, int Kp, float *bsc, int rb) {                                           \
        (void)rb;                                                                                               \
        rows_compute(F, RB, P, ep, rows, nrows, R, xr, res, buf, Kp, bsc);                                      \
    }
ROWS_FN(K_BF16, 0, rows_bf16)
ROWS_FN(K_MXFP4, 0, rows_mxfp4)
ROWS_FN(K_F16, rb, rows_f16)
ROWS_FN(K_F32, rb, rows_f32)
ROWS_FN(K_FP8, rb, rows_fp8)
ROWS_FN(K_INT4, rb, rows_int4)
ROWS_FN(K_INT8, rb, rows_int8)
ROWS_FN(K_INT4S, rb, rows_int4s)
ROWS_FN(K_INT8S, rb, rows_int8s)

typedef void (*rows_fn)(const mp_proj *, const int64_t *, const int *, int, int, const xe_t *const *, float *,
                        xe_t *, int, float *, int);

AI int kind_of(const mp_proj *P) {
    switch (P->fmt) {
    case MP_W_INT4: return P->has_zp ? K_INT4 : K_INT4S;
    case MP_W_INT8: return P->has_zp ? K_INT8 : K_INT8S;
    default: return P->fmt;
    }
}

static rows_fn pick_rows(const mp_proj *P) {
    switch (kind_of(P)) {
    case K_BF16: return rows_bf16;
    case K_MXFP4: return rows_mxfp4;
    case K_F16: return rows_f16;
    case K_F32: return rows_f32;
    case K_FP8: return rows_fp8;
    case K_INT4: return rows_int4;
    case K_INT8: return rows_int8;
    case K_INT4S: return rows_int4s;
    case K_INT8S: return rows_int8s;
    }
    return NULL;
}

/* ------------------------------------------------------------------ activations (fp32, VL lanes) */
/* exp as Cephes' expf: range reduction by ln 2 in two parts, degree-6 polynomial, 2**n through the exponent
 * field (about 1 ulp); above ln(FLT_MAX) it is inf and NaN stays NaN, so sigmoid and silu saturate like torch's */
AI vf_t vexp(vf_t x0) {
    vf_t x = VF_MIN(VF_MAX(x0, VF_SET1(-87.3f)), VF_SET1(88.3f));
    vf_t fx = VF_RINT(VF_MUL(x, VF_SET1(1.44269504088896341f)));
    x = VF_SUB(x, VF_MUL(fx, VF_SET1(0.693359375f)));
    x = VF_SUB(x, VF_MUL(fx, VF_SET1(-2.12194440e-4f)));
    vf_t y = VF_SET1(1.9875691500e-4f);
    y = VF_FMA(y, x, VF_SET1(1.3981999507e-3f));
    y = VF_FMA(y, x, VF_SET1(8.3334519073e-3f));
    y = VF_FMA(y, x, VF_SET1(4.1665795894e-2f));
    y = VF_FMA(y, x, VF_SET1(1.6666665459e-1f));
    y = VF_FMA(y, x, VF_SET1(5.0000001201e-1f));
    y = VF_FMA(y, VF_MUL(x, x), VF_ADD(x, VF_SET1(1.0f)));
    vi_t n = VI_SLLI(VI_ADD(VF_TOI(fx), VI_SET1(127)), 23);
    y = VF_MUL(y, VI_ASF(n));
    y = VF_SEL(x0, VF_SET1(88.72283f), _CMP_GT_OQ, VF_SET1(__builtin_inff()), y);
    return VF_SEL(x0, x0, _CMP_UNORD_Q, x0, y);
}

AI vf_t act_apply(int act, vf_t g, vf_t u, float alpha, float limit) {
    const vf_t one = VF_SET1(1.0f);
    switch (act) {
    case MP_ACT_GPTOSS: { /* gpt-oss: clamp, gate * sigmoid(alpha * gate) * (up + 1) */
        g = VF_MIN(g, VF_SET1(limit));
        u = VF_MAX(VF_MIN(u, VF_SET1(limit)), VF_SET1(-limit));
        vf_t glu = VF_DIV(g, VF_ADD(one, vexp(VF_MUL(g, VF_SET1(-alpha)))));
        return VF_MUL(VF_ADD(u, one), glu);
    }
    case MP_ACT_GELU_TANH: { /* gelu (tanh approximation) * up; tanh z = 1 - 2 / (exp(2z) + 1) */
        vf_t z = VF_MUL(VF_SET1(0.7978845608028654f), VF_FMA(VF_MUL(VF_SET1(0.044715f), g), VF_MUL(g, g), g));
        vf_t t = VF_SUB(one, VF_DIV(VF_SET1(2.0f), VF_ADD(vexp(VF_ADD(z, z)), one)));
        return VF_MUL(VF_MUL(VF_MUL(VF_SET1(0.5f), g), VF_ADD(one, t)), u);
    }
    default: /* silu(gate) * up, silu first (gate * up alone can overflow where the result does not) */
        return VF_MUL(VF_DIV(g, VF_ADD(one, vexp(VF_SUB(VF_SET1(0.0f), g)))), u);
    }
}

/* ------------------------------------------------------------------ the layer call */
AI int64_t up64(int64_t n) { return (n + 63) & ~(int64_t)63; }
AI int rup(int n, int m) { return (n + m - 1) / m * m; }

typedef struct {
    int32_t *cnt, *start, *list, *active;
    xe_t *xc, *ac;
    uint8_t *thread_base;
    int64_t thread_bytes;
    int nact, S, Kpx, Ip, Kmaxp;
} ws_t;

static int64_t layout(const mp_layer *L, int T, int k, int mode, int wi, int nthreads, uint8_t *base, ws_t *w) {
    int E = L->num_experts, S = T * k;
    int Kin = mode == MP_MODE_DOWN ? L->inter : L->hidden;
    int Kpx = rup(Kin, CK), Ip = rup(L->inter, CK);
    int Kmaxp = rup(L->hidden > L->inter ? L->hidden : L->inter, CK);
    int64_t rows_x = (mode == MP_MODE_DOWN || wi) ? S : T;
    int64_t off = 0;
    int64_t o_cnt = off; off += up64(4 * (int64_t)E);
    int64_t o_start = off; off += up64(4 * ((int64_t)E + 1));
    int64_t o_list = off; off += up64(4 * (int64_t)S);
    int64_t o_act = off; off += up64(4 * (int64_t)E);
    int64_t o_xc = off; off += up64(rows_x * Kpx * (int64_t)sizeof(xe_t));
    int64_t o_ac = off; off += mode == MP_MODE_FUSED ? up64((int64_t)S * Ip * (int64_t)sizeof(xe_t)) : 0;
    int64_t tb = up64((int64_t)MR * Kmaxp * sizeof(xe_t)) + up64((int64_t)TCH * 2 * NB * 4) +
                 up64((int64_t)T * HB * 4) + up64((int64_t)TCH * sizeof(void *)) +
                 up64(4 * (int64_t)MR * (Kmaxp / 32 + 1));
    int64_t o_thr = off;
    off += tb * (nthreads > 0 ? nthreads : 1);
    if (w) {
        w->cnt = (int32_t *)(base + o_cnt);
        w->start = (int32_t *)(base + o_start);
        w->list = (int32_t *)(base + o_list);
        w->active = (int32_t *)(base + o_act);
        w->xc = (xe_t *)(base + o_xc);
        w->ac = (xe_t *)(base + o_ac);
        w->thread_base = base + o_thr;
        w->thread_bytes = tb;
        w->S = S;
        w->Kpx = Kpx;
        w->Ip = Ip;
        w->Kmaxp = Kmaxp;
    }
    return off + 64; /* slack for aligning the base */
}

/* a thread's scratch: decoded rows, tile results, down accumulators, x row pointers, block scales */
typedef struct {
    xe_t *buf;
    float *res, *acc, *bsc;
    const xe_t **xr;
} tws_t;

AI tws_t thread_scratch(const ws_t *w, int T, uint8_t *base) {
    tws_t t;
    t.buf = (xe_t *)base;
    t.res = (float *)(base + up64((int64_t)MR * w->Kmaxp * sizeof(xe_t)));
    t.acc = (float *)((uint8_t *)t.res + up64((int64_t)TCH * 2 * NB * 4));
    t.xr = (const xe_t **)((uint8_t *)t.acc + up64((int64_t)T * HB * 4));
    t.bsc = (float *)((uint8_t *)t.xr + up64((int64_t)TCH * sizeof(void *)));
    return t;
}

int64_t EXPORT(mp_workspace)(const mp_layer *L, int T, int k, int mode, int weight_inputs, int nthreads) {
    return layout(L, T, k, mode, weight_inputs, nthreads, NULL, NULL);
}

AI const int64_t *eptrs(const mp_layer *L, int e) { return L->table + (int64_t)e * MP_PTRS; }

/* one gate_up unit of the fused call: pairs j0 .. j0+jn of expert e, for its slots, activation included */
static void unit_gate_up_fused(const mp_layer *L, const mp_call *C, const ws_t *w, rows_fn fn, int e, int j0,
                               uint8_t *tws) {
    const mp_proj *P = &L->gu;
    const int I = L->inter, jn = I - j0 < JB ? I - j0 : JB, inter = L->glu == MP_GLU_INTERLEAVED;
    const int64_t *ep = eptrs(L, e);
    int rows[2 * JB];
    for (int i = 0; i < 2 * jn; i++) rows[i] = inter ? 2 * j0 + i : (i < jn ? j0 + i : I + j0 + i - jn);
    const tws_t sc = thread_scratch(w, C->T, tws);
    float *res = sc.res;
    const xe_t **xr = sc.xr;
    const void *bias = (const void *)(uintptr_t)ep[MP_GU_B];
    const int nr = 2 * jn;
    float gb[JB], ub[JB];
    for (int j = 0; j < jn; j++) {
        int gr = inter ? 2 * (j0 + j) : j0 + j, ur = inter ? 2 * (j0 + j) + 1 : I + j0 + j;
        gb[j] = bias ? ld_elem(bias, gr, P->bias_dtype) : 0.0f;
        ub[j] = bias ? ld_elem(bias, ur, P->bias_dtype) : 0.0f;
    }
    const int s0 = w->start[e], s1 = w->start[e + 1];
    for (int c0 = s0; c0 < s1; c0 += TCH) {
        int R = s1 - c0 < TCH ? s1 - c0 : TCH;
        for (int r = 0; r < R; r++) {
            int slot = w->list[c0 + r];
            xr[r] = w->xc + (int64_t)(C->weight_inputs ? slot : slot / C->k) * w->Kpx;
        }
        fn(P, ep, rows, nr, R, xr, res, sc.buf, w->Kpx, sc.bsc, C->round_bf16);
        for (int r = 0; r < R; r++) {
            float g[JB] __attribute__((aligned(64))), u[JB] __attribute__((aligned(64)));
            const float *rr = res + (int64_t)r * nr;
            for (int j = 0; j < JB; j++) {
                int jj = j < jn ? j : jn - 1;
                g[j] = (inter ? rr[2 * jj] : rr[jj]) + gb[jj];
                u[j] = (inter ? rr[2 * jj + 1] : rr[jn + jj]) + ub[jj];
            }
            xe_t *dst = w->ac + (int64_t)w->list[c0 + r] * w->Ip + j0;
            float o[JB] __attribute__((aligned(64)));
            for (int j = 0; j < JB; j += VL)
                VF_STORE(o + j, act_apply(L->act, VF_LOAD(g + j), VF_LOAD(u + j), L->alpha, L->limit));
            for (int j = 0; j < jn; j++) dst[j] = to_xe(o[j], C->round_bf16);
            if (j0 + jn == I) /* the padding the down projection's last chunk reads: zeros, never stale NaNs */
                for (int j = I; j < w->Ip; j++) dst[j - j0] = (xe_t)0;
        }
    }
}

/* one unit of the gate_up-only call: stored rows n0 .. n0+nn of expert e into out [slot, row], bias added, in the
 * call's output dtype (fp32 for MoEKernel.gate_up; a dense linear's dtype for LinearKernel: one rounding) */
static void unit_gate_up_only(const mp_layer *L, const mp_call *C, const ws_t *w, rows_fn fn, int e, int n0,
                              uint8_t *tws) {
    const mp_proj *P = &L->gu;
    const int N = P->rows, nn = N - n0 < NB ? N - n0 : NB;
    const int64_t *ep = eptrs(L, e);
    int rows[NB];
    for (int i = 0; i < nn; i++) rows[i] = n0 + i;
    const tws_t sc = thread_scratch(w, C->T, tws);
    float *res = sc.res;
    const xe_t **xr = sc.xr;
    const void *bias = (const void *)(uintptr_t)ep[MP_GU_B];
    const int s0 = w->start[e], s1 = w->start[e + 1];
    for (int c0 = s0; c0 < s1; c0 += TCH) {
        int R = s1 - c0 < TCH ? s1 - c0 : TCH;
        for (int r = 0; r < R; r++) {
            int slot = w->list[c0 + r];
            xr[r] = w->xc + (int64_t)(C->weight_inputs ? slot : slot / C->k) * w->Kpx;
        }
        fn(P, ep, rows, nn, R, xr, res, sc.buf, w->Kpx, sc.bsc, C->round_bf16);
        for (int r = 0; r < R; r++) {
            const int64_t o = (int64_t)w->list[c0 + r] * C->out_stride + n0;
            for (int i = 0; i < nn; i++)
                st_elem(C->out, o + i, C->out_dtype,
                        res[r * nn + i] + (bias ? ld_elem(bias, n0 + i, P->bias_dtype) : 0.0f));
        }
    }
}

/* one down unit: output rows h0 .. h0+hn over every active expert, weighted and summed per token, then written */
static void unit_down(const mp_layer *L, const mp_call *C, const ws_t *w, rows_fn fn, const xe_t *act, int h0,
                      uint8_t *tws) {
    const mp_proj *P = &L->dn;
    const int H = P->rows, hn = H - h0 < HB ? H - h0 : HB, T = C->T;
    int rows[HB];
    for (int i = 0; i < hn; i++) rows[i] = h0 + i;
    const tws_t sc = thread_scratch(w, T, tws);
    float *res = sc.res, *acc = sc.acc;
    const xe_t **xr = sc.xr;
    memset(acc, 0, (size_t)T * HB * 4);
    for (int a = 0; a < w->nact; a++) {
        const int e = w->active[a];
        const int64_t *ep = eptrs(L, e);
        const void *bias = (const void *)(uintptr_t)ep[MP_DN_B];
        float b[HB];
        for (int i = 0; i < hn; i++) b[i] = bias ? ld_elem(bias, h0 + i, P->bias_dtype) : 0.0f;
        const int s0 = w->start[e], s1 = w->start[e + 1];
        for (int c0 = s0; c0 < s1; c0 += TCH) {
            int R = s1 - c0 < TCH ? s1 - c0 : TCH;
            for (int r = 0; r < R; r++) xr[r] = act + (int64_t)w->list[c0 + r] * w->Ip;
            fn(P, ep + MP_DN_W, rows, hn, R, xr, res, sc.buf, w->Ip, sc.bsc, C->round_bf16);
            for (int r = 0; r < R; r++) {
                int slot = w->list[c0 + r];
                float wt = C->weight_inputs ? 1.0f : ld_elem(C->wts, slot, C->w_dtype);
                float *dst = acc + (int64_t)(slot / C->k) * HB;
                for (int i = 0; i < hn; i++) dst[i] += wt * (res[r * hn + i] + b[i]);
            }
        }
    }
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < hn; i++) {
            int64_t o = (int64_t)t * C->out_stride + h0 + i;
            float v = acc[t * HB + i];
            if (C->accumulate) v += ld_elem(C->out, o, C->out_dtype);
            st_elem(C->out, o, C->out_dtype, v);
        }
    }
}

/* x (or a, or x * routing weight) row into the workspace in the compute format, zero-padded to Kp */
static void convert_row(const mp_call *C, const ws_t *w, int64_t r, int K) {
    int64_t src;
    float scale = 1.0f;
    if (C->mode == MP_MODE_DOWN) {
        src = r;
    } else if (C->weight_inputs) {
        src = r / C->k;
        scale = ld_elem(C->wts, r, C->w_dtype);
    } else {
        src = r;
    }
    xe_t *dst = w->xc + r * w->Kpx;
    const int64_t base = src * C->x_stride;
    const int rb = C->round_bf16;
    /* Llama 4 scales the expert input in the model dtype: one rounding of the product, as there */
    for (int i = 0; i < K; i++) dst[i] = to_xe(ld_elem(C->x, base + i, C->x_dtype) * scale, rb);
    for (int i = K; i < w->Kpx; i++) dst[i] = (xe_t)0;
}

AI int slot_ok(const mp_layer *L, int mode, int64_t e) {
    if (e < 0 || e >= L->num_experts) return 0;
    const int64_t *ep = eptrs(L, (int)e);
    return (mode == MP_MODE_DOWN || ep[MP_GU_W] != 0) && (mode == MP_MODE_GATE_UP || ep[MP_DN_W] != 0);
}

int EXPORT(mp_run)(const mp_layer *L, const mp_call *C) {
    if (!L || !C || C->T < 0 || C->k <= 0 || C->mode < MP_MODE_FUSED || C->mode > MP_MODE_DOWN) return MP_ERR_ARG;
    if (C->T == 0) return MP_OK;
    const int nt = C->nthreads > 0 ? C->nthreads : 1, mode = C->mode;
    uint8_t *base = (uint8_t *)(((uintptr_t)C->ws + 63) & ~(uintptr_t)63);
    ws_t w;
    if (layout(L, C->T, C->k, mode, C->weight_inputs, nt, base, &w) > C->ws_bytes) return MP_ERR_WORKSPACE;
    const rows_fn fgu = pick_rows(&L->gu), fdn = pick_rows(&L->dn);
    if ((mode != MP_MODE_DOWN && !fgu) || (mode != MP_MODE_GATE_UP && !fdn)) return MP_ERR_ARG;

    /* routing: slots grouped by expert (ascending), in slot order within an expert */
    const int E = L->num_experts, S = w.S;
    memset(w.cnt, 0, sizeof(int32_t) * (size_t)E);
    for (int s = 0; s < S; s++)
        if (slot_ok(L, mode, C->idx[s])) w.cnt[C->idx[s]]++;
    w.nact = 0;
    w.start[0] = 0;
    for (int e = 0; e < E; e++) {
        w.start[e + 1] = w.start[e] + w.cnt[e];
        if (w.cnt[e]) w.active[w.nact++] = e;
        w.cnt[e] = w.start[e];
    }
    for (int s = 0; s < S; s++)
        if (slot_ok(L, mode, C->idx[s])) w.list[w.cnt[C->idx[s]]++] = s;

    const int Kin = mode == MP_MODE_DOWN ? L->inter : L->hidden;
    const int64_t rows_x = (mode == MP_MODE_DOWN || C->weight_inputs) ? S : C->T;
    const int upe = mode == MP_MODE_FUSED ? (L->inter + JB - 1) / JB : (L->gu.rows + NB - 1) / NB;
    const int64_t U1 = (int64_t)w.nact * upe;
    const int U2 = (L->dn.rows + HB - 1) / HB;
    const xe_t *act = mode == MP_MODE_FUSED ? w.ac : w.xc;
    int ch1 = (int)(U1 / (nt * 8)), ch2 = U2 / (nt * 8);
    ch1 = ch1 > 0 ? ch1 : 1;
    ch2 = ch2 > 0 ? ch2 : 1;
    if (w.nact == 0 && mode == MP_MODE_GATE_UP) return MP_OK;
#pragma omp parallel num_threads(nt)
    {
        uint8_t *tws = w.thread_base + (int64_t)omp_get_thread_num() * w.thread_bytes;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows_x; r++) convert_row(C, &w, r, Kin);
        if (mode != MP_MODE_DOWN) {
#pragma omp for schedule(dynamic, ch1)
            for (int64_t u = 0; u < U1; u++) {
                int e = w.active[u / upe], b = (int)(u % upe);
                if (mode == MP_MODE_FUSED)
                    unit_gate_up_fused(L, C, &w, fgu, e, b * JB, tws);
                else
                    unit_gate_up_only(L, C, &w, fgu, e, b * NB, tws);
            }
        }
        if (mode != MP_MODE_GATE_UP) {
#pragma omp for schedule(dynamic, ch2)
            for (int u = 0; u < U2; u++) unit_down(L, C, &w, fdn, act, u * HB, tws);
        }
    }
    return MP_OK;
}


/* ------------------------------------------------------------------ attention of a few query rows (decode) */
/* softmax(scale * q.k + mask) . v per query row and head, in fp32, with an optional sink logit per head (gpt-oss:
 * a column of the softmax that has no value). One work item is a (batch, key/value head, query) triple: the query
 * heads sharing that key/value head (grouped-query attention) are computed together, so each cache row is read and
 * converted once for all of them, in place (no repeated copies of the cache). A row with every key masked and no
 * sink is zeros. Per thread the workspace holds G x S scores, G x D query and output rows and one cache row. */
AI void row_f32(const void *p, int dt, int n, float *dst) {
    int i = 0;
    if (dt == MP_DT_F32) {
        memcpy(dst, p, (size_t)n * 4);
        return;
    }
    const uint16_t *s = (const uint16_t *)p;
#if MP_DOT == 3
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(s + i));
        _mm256_storeu_ps(dst + i, dt == MP_DT_BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                                                   : _mm256_cvtph_ps(h));
    }
#else
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(s + i));
        _mm512_storeu_ps(dst + i, dt == MP_DT_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                                   : _mm512_cvtph_ps(h));
    }
#endif
    for (; i < n; i++) dst[i] = ld_elem(p, i, dt);
}

AI float dot_f32(const float *a, const float *b, int n) {
    vacc_t acc = acc_zero();
    int i = 0;
    for (; i + VL <= n; i += VL) acc = VF_FMA(VF_LOAD(a + i), VF_LOAD(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

AI void axpy_f32(float *y, float a, const float *x, int n) {
    int i = 0;
    const vf_t va = VF_SET1(a);
    for (; i + VL <= n; i += VL) VF_STORE(y + i, VF_FMA(va, VF_LOAD(x + i), VF_LOAD(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

#if MP_DOT == 1
/* the four sums of a0 .. a3 (lanes 0 .. 3 of the result) */
AI __m128 hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* raw scores q_g . k_j of keys j .. j+3 for the G heads of a group, bf16 queries and keys (D a multiple of 32):
 * products of bf16 values are exact in fp32, so this is the fp32 path's sum in another order. Each q chunk serves
 * four keys and the four sums are reduced together. out[g * 4 + i] for key j + i. */
AI void scores4_bf16(const uint16_t *q, int G, int D, const uint8_t *k, int64_t kstride, float *out) {
    for (int g = 0; g < G; g++) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const uint16_t *qg = q + (int64_t)g * D;
        for (int i = 0; i < D; i += 32) {
            const __m512bh qv = (__m512bh)_mm512_loadu_si512(qg + i);
            const uint8_t *kr = k + 2 * i;
            a0 = _mm512_dpbf16_ps(a0, qv, (__m512bh)_mm512_loadu_si512(kr));
            a1 = _mm512_dpbf16_ps(a1, qv, (__m512bh)_mm512_loadu_si512(kr + kstride));
            a2 = _mm512_dpbf16_ps(a2, qv, (__m512bh)_mm512_loadu_si512(kr + 2 * kstride));
            a3 = _mm512_dpbf16_ps(a3, qv, (__m512bh)_mm512_loadu_si512(kr + 3 * kstride));
        }
        _mm_storeu_ps(out + 4 * g, hsum4(a0, a1, a2, a3));
    }
}
#endif

#if MP_DOT != 3
/* o0 (o1) = sum_j p0[j] (p1[j]) v_j for one or two heads over bf16 value rows of D = 16 * NV: the sums stay in
 * registers and each value row is converted once for both heads */
#define PV_PAIR(NV)                                                                                                  \
    static void pv_pair_##NV(const float *p0, const float *p1, int S, const uint8_t *vb, int64_t vstride, float *o0, \
                             float *o1) {                                                                            \
        __m512 a[NV], c[NV];                                                                                         \
        _Pragma("GCC unroll 8") for (int i = 0; i < NV; i++) a[i] = c[i] = _mm512_setzero_ps();                      \
        for (int j = 0; j < S; j++) {                                                                                \
            const float x = p0[j], y = p1 ? p1[j] : 0.0f;                                                            \
            if (x == 0.0f && y == 0.0f) continue;                                                                    \
            const uint8_t *vr = vb + (int64_t)j * vstride;                                                           \
            const __m512 bx = _mm512_set1_ps(x), by = _mm512_set1_ps(y);                                             \
            _Pragma("GCC unroll 8") for (int i = 0; i < NV; i++) {                                                   \
                const __m512 v = _mm512_castsi512_ps(                                                                \
                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vr + 32 * i))), 16)); \
                a[i] = _mm512_fmadd_ps(bx, v, a[i]);                                                                 \
                c[i] = _mm512_fmadd_ps(by, v, c[i]);                                                                 \
            }                                                                                                        \
        }                                                                                                            \
        _Pragma("GCC unroll 8") for (int i = 0; i < NV; i++) {                                                       \
            _mm512_storeu_ps(o0 + 16 * i, a[i]);                                                                     \
            if (o1) _mm512_storeu_ps(o1 + 16 * i, c[i]);                                                             \
        }                                                                                                            \
    }
PV_PAIR(4)
PV_PAIR(8)
#endif

AI int attn_group(const mp_attn *A) { return A->Hq / A->Hkv; }
AI int64_t attn_ws_thread(const mp_attn *A) {
    const int64_t G = attn_group(A);
    return up64((G * A->S + 2 * G * A->D + A->D) * 4);
}

int64_t EXPORT(mp_attend_workspace)(const mp_attn *A) {
    return 64 + (A->nthreads > 0 ? A->nthreads : 1) * attn_ws_thread(A);
}

static void attend_group(const mp_attn *A, int b, int hk, int t, float *ws) {
    const int S = A->S, D = A->D, G = attn_group(A), h0 = hk * G;
    const int kvs = sdt_size(A->kv_dtype), qsz = sdt_size(A->q_dtype);
    float *sc = ws, *qf = sc + (int64_t)G * S, *acc = qf + (int64_t)G * D, *kf = acc + (int64_t)G * D;
    const uint8_t *kb = (const uint8_t *)A->k + ((int64_t)b * A->ks[0] + (int64_t)hk * A->ks[1]) * kvs;
    const uint8_t *vb = (const uint8_t *)A->v + ((int64_t)b * A->vs[0] + (int64_t)hk * A->vs[1]) * kvs;
    for (int g = 0; g < G; g++)
        row_f32((const uint8_t *)A->q +
                    ((int64_t)b * A->qs[0] + (int64_t)(h0 + g) * A->qs[1] + (int64_t)t * A->qs[2]) * qsz,
                A->q_dtype, D, qf + (int64_t)g * D);
    const int last = A->mask_kind == MP_MASK_NONE && A->causal ? S - A->Tq + t : S - 1; /* keys past it: masked */
    const float ninf = -__builtin_inff();
    const int64_t mrow = (int64_t)b * A->ms[0] + (int64_t)t * A->ms[2];
    int j = 0;
#if MP_DOT == 1
    if (A->q_dtype == MP_DT_BF16 && A->kv_dtype == MP_DT_BF16 && D % 32 == 0 && G <= 64) {
        /* bf16 queries as stored (in the output rows' space, free until the values) against four keys at a time */
        uint16_t *qh = (uint16_t *)acc;
        for (int g = 0; g < G; g++)
            memcpy(qh + (int64_t)g * D,
                   (const uint8_t *)A->q +
                       ((int64_t)b * A->qs[0] + (int64_t)(h0 + g) * A->qs[1] + (int64_t)t * A->qs[2]) * qsz,
                   (size_t)D * 2);
        float s4[4 * 64];
        for (; j + 4 <= S && j + 3 <= last; j += 4) {
            scores4_bf16(qh, G, D, kb + (int64_t)j * A->ks[2] * kvs, A->ks[2] * kvs, s4);
            for (int g = 0; g < G; g++)
                for (int i = 0; i < 4; i++) {
                    const int64_t mi = mrow + (int64_t)(h0 + g) * A->ms[1] + j + i;
                    float s = s4[4 * g + i] * A->scale;
                    if (A->mask_kind == MP_MASK_ADD) s += ld_elem(A->mask, mi, A->mask_dtype);
                    if (A->mask_kind == MP_MASK_BOOL && !((const uint8_t *)A->mask)[mi]) s = ninf;
                    sc[(int64_t)g * S + j + i] = s;
                }
        }
    }
#endif
    for (; j < S; j++) {
        int any = j <= last;
        if (A->mask_kind == MP_MASK_BOOL) {
            any = 0;
            for (int g = 0; g < G; g++) any |= ((const uint8_t *)A->mask)[mrow + (int64_t)(h0 + g) * A->ms[1] + j];
        }
        if (!any) {
            for (int g = 0; g < G; g++) sc[(int64_t)g * S + j] = ninf;
            continue;
        }
        row_f32(kb + (int64_t)j * A->ks[2] * kvs, A->kv_dtype, D, kf);
        for (int g = 0; g < G; g++) {
            const int64_t mi = mrow + (int64_t)(h0 + g) * A->ms[1] + j;
            float s = dot_f32(qf + (int64_t)g * D, kf, D) * A->scale;
            if (A->mask_kind == MP_MASK_ADD) s += ld_elem(A->mask, mi, A->mask_dtype);
            if (A->mask_kind == MP_MASK_BOOL && !((const uint8_t *)A->mask)[mi]) s = ninf;
            sc[(int64_t)g * S + j] = s;
        }
    }
    float inv[G];
    for (int g = 0; g < G; g++) {
        float *r = sc + (int64_t)g * S;
        float mx = A->sinks ? ld_elem(A->sinks, h0 + g, A->sinks_dtype) : ninf;
        for (int j = 0; j < S; j++) mx = r[j] > mx ? r[j] : mx;
        float l = 0.0f;
        if (mx != ninf) {
            int j = 0;
            vf_t vl = VF_SET1(0.0f);
            for (; j + VL <= S; j += VL) {
                vf_t p = vexp(VF_SUB(VF_LOAD(r + j), VF_SET1(mx)));
                VF_STORE(r + j, p);
                vl = VF_ADD(vl, p);
            }
            l = hsum(vl);
            for (; j < S; j++) l += (r[j] = expf(r[j] - mx));
            if (A->sinks) l += expf(ld_elem(A->sinks, h0 + g, A->sinks_dtype) - mx);
        } else {
            for (int j = 0; j < S; j++) r[j] = 0.0f;
        }
        inv[g] = l > 0.0f ? 1.0f / l : 0.0f;
    }
    int pv_done = 0;
#if MP_DOT != 3
    if (A->kv_dtype == MP_DT_BF16 && (D == 64 || D == 128)) {
        const int64_t vstride = A->vs[2] * kvs;
        for (int g = 0; g < G; g += 2) {
            const float *p1 = g + 1 < G ? sc + (int64_t)(g + 1) * S : NULL;
            float *o1 = g + 1 < G ? acc + (int64_t)(g + 1) * D : NULL;
            if (D == 64)
                pv_pair_4(sc + (int64_t)g * S, p1, S, vb, vstride, acc + (int64_t)g * D, o1);
            else
                pv_pair_8(sc + (int64_t)g * S, p1, S, vb, vstride, acc + (int64_t)g * D, o1);
        }
        pv_done = 1;
    }
#endif
    if (!pv_done) {
        memset(acc, 0, (size_t)G * D * 4);
        for (int j = 0; j < S; j++) {
            int any = 0;
            for (int g = 0; g < G; g++) any |= sc[(int64_t)g * S + j] != 0.0f;
            if (!any) continue;
            row_f32(vb + (int64_t)j * A->vs[2] * kvs, A->kv_dtype, D, kf);
            for (int g = 0; g < G; g++) {
                const float p = sc[(int64_t)g * S + j];
                if (p != 0.0f) axpy_f32(acc + (int64_t)g * D, p, kf, D);
            }
        }
    }
    for (int g = 0; g < G; g++) {
        const int64_t ob = (int64_t)b * A->os[0] + (int64_t)(h0 + g) * A->os[1] + (int64_t)t * A->os[2];
        for (int i = 0; i < D; i++) st_elem(A->out, ob + i, A->out_dtype, acc[(int64_t)g * D + i] * inv[g]);
    }
}

int EXPORT(mp_attend)(const mp_attn *A) {
    if (!A || A->B < 0 || A->Tq < 0 || A->S < 0 || A->D <= 0 || A->Hq <= 0 || A->Hkv <= 0 || A->Hq % A->Hkv ||
        A->ws_bytes < VNAME(mp_attend_workspace)(A))
        return MP_ERR_ARG;
    const int64_t items = (int64_t)A->B * A->Hkv * A->Tq;
    const int nt = A->nthreads > 0 ? A->nthreads : 1;
    uint8_t *base = (uint8_t *)(((uintptr_t)A->ws + 63) & ~(uintptr_t)63);
    const int64_t tb = attn_ws_thread(A);
#pragma omp parallel num_threads(nt) if (items > 1)
    {
        float *ws = (float *)(base + (int64_t)omp_get_thread_num() * tb);
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            const int t = (int)(it % A->Tq), hk = (int)(it / A->Tq % A->Hkv);
            attend_group(A, (int)(it / ((int64_t)A->Tq * A->Hkv)), hk, t, ws);
        }
    }
    return MP_OK;
}

/* ------------------------------------------------------------------ one expert's projection, decoded densely */
#define DROW_FN(F, RB, name)                                                                                \
    NI void name(const mp_proj *P, const int64_t *ep, int n, void *out, int odt, int rb) {                  \
        (void)rb;                                                                                           \
        cur_t c;                                                                                            \
        cur_init(&c, P, ep, n);                                                                             \
        const int K = P->cols;                                                                              \
        xe_t tmp[CK] __attribute__((aligned(64)));                                                          \
        const int direct = !is_blk(F) && odt == (MP_DOT == 1 ? MP_DT_BF16 : MP_DT_F32);                    \
        for (int k0 = 0; k0 < K; k0 += CK) {                                                                \
            int kn = K - k0 < CK ? K - k0 : CK;                                                             \
            vw_t v = kn == CK ? dec(F, RB, &c, P, k0) : dec_tail(F, RB, &c, P, k0, K);                      \
            if (direct && kn == CK) {                                                                       \
                wstore((xe_t *)out + (int64_t)n * K + k0, v);                                               \
                continue;                                                                                   \
            }                                                                                               \
            wstore(tmp, v);                                                                                 \
            const float s = is_blk(F) ? bscale(&c, P, k0 >> P->b1_shift) : 1.0f;                           \
            for (int i = 0; i < kn; i++) {                                                                  \
                float f = MP_DOT == 1 ? bits_f32((uint32_t)tmp[i] << 16) : (float)tmp[i];                   \
                st_elem(out, (int64_t)n * K + k0 + i, odt, is_blk(F) ? f * s : f);                          \
            }                                                                                               \
        }                                                                                                   \
    }
typedef void (*drow_fn)(const mp_proj *, const int64_t *, int, void *, int, int);
DROW_FN(K_BF16, 0, drow_bf16)
DROW_FN(K_MXFP4, 0, drow_mxfp4)
DROW_FN(K_F16, rb, drow_f16)
DROW_FN(K_F32, rb, drow_f32)
DROW_FN(K_FP8, rb, drow_fp8)
DROW_FN(K_INT4, rb, drow_int4)
DROW_FN(K_INT8, rb, drow_int8)
DROW_FN(K_INT4S, rb, drow_int4s)
DROW_FN(K_INT8S, rb, drow_int8s)

static drow_fn pick_drow(const mp_proj *P) {
    switch (kind_of(P)) {
    case K_BF16: return drow_bf16;
    case K_MXFP4: return drow_mxfp4;
    case K_F16: return drow_f16;
    case K_F32: return drow_f32;
    case K_FP8: return drow_fp8;
    case K_INT4: return drow_int4;
    case K_INT8: return drow_int8;
    case K_INT4S: return drow_int4s;
    case K_INT8S: return drow_int8s;
    }
    return NULL;
}

/* expert e's gate_up (which = 0) or down (1) projection as a dense [rows, cols] matrix of out_dtype (f32 or bf16),
 * with the values the kernel computes with (so a torch GEMM on it is the kernel's arithmetic, reordered) */
int EXPORT(mp_decode)(const mp_layer *L, int which, int e, void *out, int out_dtype, int round_bf16, int nthreads) {
    if (!L || e < 0 || e >= L->num_experts || (out_dtype != MP_DT_F32 && out_dtype != MP_DT_BF16)) return MP_ERR_ARG;
    const mp_proj *P = which ? &L->dn : &L->gu;
    const int64_t *ep = eptrs(L, e) + (which ? MP_DN_W : MP_GU_W);
    drow_fn fn = pick_drow(P);
    if (!ep[0] || !fn) return MP_ERR_ARG;
    const int N = P->rows;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
    for (int n = 0; n < N; n++) fn(P, ep, n, out, out_dtype, round_bf16);
    return MP_OK;
}

/* ------------------------------------------------------------------ self-test (run by the probe in a child) */
/* A small layer in several formats, run through mp_run and checked against a scalar reference written from the
 * formats' definitions. Executes the variant's instructions (decoders, dot products, activations, threads); a
 * CPU or VM that lacks them dies here with SIGILL in the probe's child process, one that computes them wrong
 * returns the number of the failed check. */
static uint32_t st_rng = 12345u;
static uint32_t st_next(void) { return st_rng = st_rng * 1664525u + 1013904223u; }

static float st_fp8(uint8_t b) { /* e4m3 by definition */
    int e = (b >> 3) & 15, m = b & 7;
    float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
    return b & 0x80 ? -v : v;
}

static float st_weight(const mp_proj *P, const int64_t *ep, int n, int k) {
    if (P->split && n >= P->split) {
        n -= P->split;
        ep += MP_UP_W;
    }
    const uint8_t *w = (const uint8_t *)(uintptr_t)ep[0] + (int64_t)n * P->wrow_bytes;
    const uint8_t *s = ep[1] ? (const uint8_t *)(uintptr_t)ep[1] : NULL;
    int64_t si = (int64_t)(n / P->b0) * P->scols + (k >> P->b1_shift);
    static const float fp4[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.f, -.5f, -1, -1.5f, -2, -3, -4, -6};
    switch (P->fmt) {
    case MP_W_BF16: return bits_f32((uint32_t)((const uint16_t *)w)[k] << 16);
    case MP_W_FP8: return round_bf16(st_fp8(w[k]) * sload(s, si, P->sdtype));
    case MP_W_MXFP4: return fp4[(w[k >> 1] >> (4 * (k & 1))) & 15] * ldexpf(1.0f, s[si] - 127);
    case MP_W_INT4: {
        int q = (w[k >> 1] >> (4 * (k & 1))) & 15, z = 8;
        if (P->has_zp) {
            const uint32_t *zw = (const uint32_t *)(uintptr_t)ep[2];
            z = (int)((zw[(n / 8) * P->scols + (k >> P->b1_shift)] >> (4 * (n % 8))) & 15);
        }
        return round_bf16(round_bf16((float)(q - z) * sload(s, si, P->sdtype)));
    }
    default: return round_bf16((float)((int)w[k] - 128) * sload(s, si, P->sdtype)); /* INT8, symmetric */
    }
}

static int st_case(int gu_fmt, int dn_fmt, int act, int nthreads) {
    enum { E = 2, H = 64, I = 32, T = 3, K = 2 };
    static uint8_t gw[E][2 * I][H * 2], dw[E][H][I * 2];
    static float gs[E][2 * I][H / 32], ds[E][H][I];
    static uint16_t gsb[E][2 * I][H / 32];
    static uint8_t gs8[E][2 * I][H / 32];
    static uint32_t gz[E][2 * I / 8][H / 32];
    static float x[T][H], out[T][H], ref[T][H], wts[T][K];
    static int64_t idx[T][K], table[E][MP_PTRS];
    mp_layer L;
    memset(&L, 0, sizeof L);
    L.num_experts = E; L.hidden = H; L.inter = I; L.glu = MP_GLU_HALVES; L.act = act; L.alpha = 1.702f; L.limit = 7.0f;
    L.table = &table[0][0];
    for (int e = 0; e < E; e++) {
        for (int n = 0; n < 2 * I; n++) {
            for (int i = 0; i < H * 2; i++) gw[e][n][i] = (uint8_t)(st_next() >> 24);
            for (int g = 0; g < H / 32; g++) {
                gs8[e][n][g] = (uint8_t)(124 + (st_next() >> 30));
                gsb[e][n][g] = (uint16_t)(0x3c00 + (st_next() >> 26)); /* bf16 around 2**-7 */
            }
        }
        for (int r = 0; r < 2 * I / 8; r++)
            for (int g = 0; g < H / 32; g++) gz[e][r][g] = st_next();
        for (int n = 0; n < H; n++) {
            for (int i = 0; i < I * 2; i++) {
                uint8_t b = (uint8_t)(st_next() >> 24);
                if (dn_fmt == MP_W_FP8 && (b & 0x7f) > 0x60) b &= 0xbf; /* moderate magnitudes, no NaN codes */
                dw[e][n][i] = b;
            }
            for (int i = 0; i < I; i++) ds[e][n][i] = 0.001f + (st_next() >> 8) * 0x1p-34f;
        }
        mp_proj *G = &L.gu, *D = &L.dn;
        G->fmt = gu_fmt; G->rows = 2 * I; G->cols = H; G->b0 = 1; G->b1_shift = 5; G->scols = H / 32; G->bits = 4;
        G->bias_dtype = MP_DT_NONE;
        G->wrow_bytes = H / 2;
        G->sdtype = gu_fmt == MP_W_MXFP4 ? MP_DT_E8M0 : MP_DT_BF16;
        G->has_zp = gu_fmt == MP_W_INT4;
        table[e][MP_GU_W] = (int64_t)(uintptr_t)gw[e];
        table[e][MP_GU_S] = gu_fmt == MP_W_MXFP4 ? (int64_t)(uintptr_t)gs8[e] : (int64_t)(uintptr_t)gsb[e];
        table[e][MP_GU_Z] = (int64_t)(uintptr_t)gz[e];
        (void)gs;
        D->fmt = dn_fmt; D->rows = H; D->cols = I; D->sdtype = MP_DT_F32; D->bias_dtype = MP_DT_NONE; D->bits = 8;
        if (dn_fmt == MP_W_FP8) { D->b0 = 32; D->b1_shift = 5; D->scols = 1; D->wrow_bytes = I; }
        else if (dn_fmt == MP_W_INT8) { D->b0 = 1; D->b1_shift = 31; D->scols = 1; D->wrow_bytes = I; }
        else { D->b0 = 1; D->b1_shift = 31; D->scols = 1; D->wrow_bytes = 2 * I; }
        if (dn_fmt == MP_W_BF16)
            for (int n = 0; n < H; n++)
                for (int i = 0; i < I; i++)
                    ((uint16_t *)dw[e][n])[i] = (uint16_t)(0x3c00 + (st_next() >> 25) + ((st_next() >> 31) << 15));
        table[e][MP_DN_W] = (int64_t)(uintptr_t)dw[e];
        table[e][MP_DN_S] = (int64_t)(uintptr_t)ds[e];
    }
    for (int t = 0; t < T; t++) {
        for (int h = 0; h < H; h++) x[t][h] = round_bf16(((int)(st_next() >> 28) - 8) * 0.125f);
        for (int j = 0; j < K; j++) {
            idx[t][j] = (t + j) % (E + 1) == E ? -1 : (t + j) % (E + 1); /* one skipped slot */
            wts[t][j] = 0.25f * (j + 1);
        }
    }
    /* reference */
    memset(ref, 0, sizeof ref);
    for (int t = 0; t < T; t++)
        for (int j = 0; j < K; j++) {
            int e = (int)idx[t][j];
            if (e < 0) continue;
            float a[I];
            for (int i = 0; i < I; i++) {
                float g = 0, u = 0;
                for (int h = 0; h < H; h++) {
                    g += st_weight(&L.gu, table[e], i, h) * x[t][h];
                    u += st_weight(&L.gu, table[e], I + i, h) * x[t][h];
                }
                a[i] = round_bf16(g / (1.0f + expf(-g)) * u);
            }
            for (int h = 0; h < H; h++) {
                float y = 0;
                for (int i = 0; i < I; i++) y += st_weight(&L.dn, &table[e][MP_DN_W], h, i) * a[i];
                ref[t][h] += wts[t][j] * y;
            }
        }
    mp_call C;
    memset(&C, 0, sizeof C);
    C.x = x; C.idx = &idx[0][0]; C.wts = wts; C.out = out; C.x_stride = H; C.out_stride = H;
    C.x_dtype = MP_DT_F32; C.w_dtype = MP_DT_F32; C.out_dtype = MP_DT_F32; C.T = T; C.k = K;
    C.mode = MP_MODE_FUSED; C.nthreads = nthreads; C.round_bf16 = 1;
    C.ws_bytes = VNAME(mp_workspace)(&L, T, K, MP_MODE_FUSED, 0, nthreads);
    void *ws = malloc((size_t)C.ws_bytes);
    if (!ws) return 99;
    C.ws = ws;
    int rc = VNAME(mp_run)(&L, &C);
    free(ws);
    if (rc) return 98;
    double num = 0, den = 0;
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            double d = (double)out[t][h] - ref[t][h];
            num += d * d;
            den += (double)ref[t][h] * ref[t][h];
        }
    return !(den > 0 && num <= 1e-4 * den); /* bf16 activations: about 1e-3 relative */
}

int EXPORT(mp_selftest)(void) {
    static const int cases[][2] = {{MP_W_MXFP4, MP_W_FP8}, {MP_W_INT4, MP_W_INT8}, {MP_W_MXFP4, MP_W_BF16}};
    for (int i = 0; i < 3; i++)
        for (int nt = 1; nt <= 2; nt++)
            if (st_case(cases[i][0], cases[i][1], MP_ACT_SILU, nt)) return 1 + i;
    return 0;
}
