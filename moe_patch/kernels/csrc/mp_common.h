/* moe-patch CPU expert kernels: the structures shared by Python (ctypes, moe_patch/kernels/library.py) and C.
 *
 * Field order and types here and in library.py must match; MP_ABI_VERSION is bumped on any change and
 * checked at load time. Weights are in nn.Linear orientation [rows = outputs, cols = inputs] as stored. */
#ifndef MP_COMMON_H
#define MP_COMMON_H

#include <stdint.h>

#define MP_ABI_VERSION 3

/* stored weight formats */
enum { MP_W_BF16 = 1, MP_W_F16 = 2, MP_W_F32 = 3, MP_W_FP8 = 4, MP_W_MXFP4 = 5, MP_W_INT4 = 6, MP_W_INT8 = 7 };
/* element types of scales, biases, activations, routing weights and outputs */
enum { MP_DT_NONE = -1, MP_DT_F32 = 0, MP_DT_BF16 = 1, MP_DT_F16 = 2, MP_DT_E8M0 = 3 };
enum { MP_ACT_SILU = 1, MP_ACT_GPTOSS = 2, MP_ACT_GELU_TANH = 3 };
enum { MP_GLU_HALVES = 0, MP_GLU_INTERLEAVED = 1 };
enum { MP_MODE_FUSED = 0, MP_MODE_GATE_UP = 1, MP_MODE_DOWN = 2 };
/* per-expert pointer table columns (0 = absent; a null weight skips the expert). MP_UP_*: the second part of a
 * gate_up projection stored as two tensors (gu.split > 0: rows from gu.split on are read there, from row 0) */
enum { MP_GU_W, MP_GU_S, MP_GU_Z, MP_GU_B, MP_DN_W, MP_DN_S, MP_DN_Z, MP_DN_B, MP_UP_W, MP_UP_S, MP_UP_Z, MP_PTRS };

/* errors returned by mp_run_* */
enum { MP_OK = 0, MP_ERR_WORKSPACE = -1, MP_ERR_ARG = -2 };

typedef struct {
    int32_t fmt;         /* MP_W_* */
    int32_t rows, cols;  /* outputs, inputs */
    int32_t sdtype;      /* scale element type (FP8, MXFP4, INT) */
    int32_t b0;          /* rows per scale row (1: per row; rows: per tensor) */
    int32_t b1_shift;    /* log2 of inputs per scale (31: one scale for the whole row) */
    int32_t scols;       /* scales per scale row */
    int32_t bits;        /* INT: 4 or 8 */
    int32_t has_zp;      /* INT: packed zero points (packed along rows, one int32 word holds 32/bits rows) */
    int32_t bias_dtype;  /* MP_DT_* of the bias, MP_DT_NONE without */
    int32_t split;       /* gate_up stored as two tensors ([gate; up] apart): rows of the first; 0: one tensor */
    int32_t pad_;
    int64_t wrow_bytes;  /* bytes per stored row */
} mp_proj;

typedef struct {
    mp_proj gu, dn;
    int32_t num_experts, hidden, inter, glu, act, pad_;
    float alpha, limit;
    const int64_t *table; /* [num_experts][MP_PTRS] addresses */
} mp_layer;

typedef struct {
    const void *x;        /* FUSED/GATE_UP: x [T, hidden]; DOWN: activations [T*k, inter] */
    const int64_t *idx;   /* [T, k] expert ids; outside [0, E) or a null weight: slot skipped */
    const void *wts;      /* [T, k] routing weights (may be null in GATE_UP mode without weight_inputs) */
    void *out;            /* FUSED/DOWN: [T, hidden]; GATE_UP: [T*k, gate_up rows] (out_dtype, bias added) */
    void *ws;             /* workspace, mp_workspace_* bytes */
    int64_t x_stride, out_stride, ws_bytes; /* strides in elements */
    int32_t x_dtype, w_dtype, out_dtype;
    int32_t T, k, mode, accumulate, weight_inputs, nthreads;
    int32_t round_bf16;   /* compute in bf16 precision: activations and decoded weights rounded to bf16 */
} mp_call;

/* attention of a few query rows over a key/value cache (mp_attend_*): q [B, Hq, Tq, D], k and v [B, Hkv, S, D],
 * mask [B, Hq, Tq, S] (broadcast dimensions have stride 0), out [B, Tq, Hq, D]; the last dimension of each is
 * contiguous, the strides of the others are given in elements (b, h, t). */
enum { MP_MASK_NONE = 0, MP_MASK_BOOL = 1, MP_MASK_ADD = 2 };
typedef struct {
    const void *q, *k, *v, *mask, *sinks;
    void *out, *ws;
    int64_t qs[3], ks[3], vs[3], ms[3], os[3];
    int64_t ws_bytes;
    int32_t B, Hq, Hkv, Tq, S, D;
    int32_t q_dtype, kv_dtype, mask_kind, mask_dtype, sinks_dtype, out_dtype;
    int32_t causal, nthreads;  /* causal: without a mask, query t sees keys up to S - Tq + t */
    float scale, pad_;
} mp_attn;

#endif
