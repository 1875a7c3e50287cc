/*
 * cpu_fast.c: the fast CPU backend (kern_cpu_ops). Same function as cpu_ref.c, same bits:
 *
 *   0. gather:  x -> fp32 rows once per token (per (token, slot) pair when the routing weight
 *               goes on the input); the shared expert's gate sigmoid(x . g) per token;
 *   1. permute: the (token, slot) pairs grouped by local expert with a counting sort (stable:
 *               token-major inside an expert), pairs of experts held elsewhere dropped;
 *   2. gate/up: per expert, per panel of 16 intermediate features: pack the 16 gate rows and the
 *               16 up rows of w13 to fp32 (cpu_gemm.h), multiply every row of the expert, and
 *               apply a = round(act(g) * u) in the epilogue;
 *   3. down:    per expert, per two panels of 16 hidden features: pack 32 rows of w2, multiply
 *               the expert's activations, and write c = round(w * out) (or round(out)) straight
 *               into its (token, slot) place: the output in slot mode, a [T*K, H] buffer
 *               otherwise;
 *   4. sum:     y[t] = round(((+0 + c[t,0]) + c[t,1]) + ... (+ s[t])) in slot order.
 *
 * Steps 2 and 3 run as items (expert, panel) on the context's thread pool; the shared expert
 * is one more "expert" whose rows are all the tokens, in the same items. Each item writes only
 * its own outputs, and a row's numbers depend on nothing but that row (cpu_gemm.h), so the
 * result is the same bits for any thread count, any batch, any order of items.
 *
 * Weights are converted from bf16/f16 per call, one 16-row panel at a time, into a per-thread
 * buffer that stays in L2 (two panels of 16 x max(H, I) floats: 256 KiB at H = 2048). No fp32
 * copy of the weights is kept: a cache would double (bf16) the resident weight memory, which
 * is what a MoE host runs short of. The price is the transposing pack, once per weight per
 * call (~0.7 cycles per weight on Zen 3): at decode it, not DRAM, sets the pace (docs/PERF.md);
 * weights pre-packed at load time in the panel layout would remove it at no memory cost.
 *
 * Large batches are cut into chunks of tokens (at most CHUNK_PAIRS (token, slot) pairs each):
 * a row's result does not depend on its batch, so chunking changes nothing but the scratch size.
 *
 * Threads: the context's owner thread drives; pool workers run items (cpu_pool.h). Scratch is
 * one grow-only arena per context.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/cpu/cpu_gemm.h"
#include "kernels/cpu/cpu_pool.h"
#include "kernels/kern_impl.h"

#define CHUNK_PAIRS 8192 /* (token, slot) pairs per chunk of a fused-experts call */
#define ROWS_PER_ITEM 16 /* tokens per item of the element-wise steps (gather, sum, routing) */

typedef struct fast_state {
    cpu_pool *pool;
    int32_t n_threads;
    void *arena; /* grow-only scratch of the calls (64-byte aligned) */
    size_t arena_cap;
} fast_state;

/* Carves 64-byte aligned pieces out of one block. */
typedef struct carver {
    char *base;
    size_t used;
} carver;

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static void *carve(carver *c, size_t n) {
    void *p = c->base ? c->base + c->used : NULL;
    c->used += align64(n);
    return p;
}

static moe_status arena_reserve(fast_state *st, size_t bytes) {
    if (bytes <= st->arena_cap)
        return MOE_OK;
    size_t want = bytes + bytes / 4;
    void *p = moe_alloc(want);
    if (!p)
        return moe_fail(MOE_ERR_NOMEM, "cpu backend: %zu bytes of scratch", want);
    moe_free(st->arena);
    st->arena = p;
    st->arena_cap = want;
    return MOE_OK;
}

/* Rounds n floats to dtype dt in place, with the base library's conversions (the same bits as
 * moe_round_to, a call per row piece instead of per element). n <= 256. */
static void round_inplace(moe_dtype dt, float *v, int32_t n) {
    if (dt == MOE_DTYPE_F32)
        return;
    uint16_t tmp[256];
    moe_from_f32(dt, v, tmp, (size_t)n);
    moe_to_f32(dt, tmp, v, (size_t)n);
}

/* ------------------------------------------------------------------------------------------
 * Context.
 * ---------------------------------------------------------------------------------------- */
static moe_status fast_init(kern_ctx_t *ctx) {
    int32_t n = ctx->params.n_threads;
    if (n < 0)
        return moe_fail(MOE_ERR_INVALID_ARG, "cpu backend: n_threads %d < 0", (int)n);
    if (n == 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int32_t)(c > 256 ? 256 : c) : 1;
    }
    fast_state *st = calloc(1, sizeof *st);
    if (!st)
        return moe_fail(MOE_ERR_NOMEM, "cpu backend state");
    moe_status s = cpu_pool_init(&st->pool, n);
    if (s != MOE_OK) {
        free(st);
        return s;
    }
    st->n_threads = n;
    ctx->impl = st;
    MOE_DEBUG(MOE_SUB_KERN, "cpu backend: %d threads, %s products", (int)n, cpu_gemm_isa());
    return MOE_OK;
}

static void fast_free(kern_ctx_t *ctx) {
    fast_state *st = ctx->impl;
    if (!st)
        return;
    cpu_pool_free(st->pool);
    moe_free(st->arena);
    free(st);
    ctx->impl = NULL;
}

static bool fast_supports(const kern_ctx_t *ctx, kern_op op, moe_dtype dt) {
    (void)ctx;
    (void)op;
    return moe_dtype_is_float(dt);
}

/* ------------------------------------------------------------------------------------------
 * Routing: one token per loop turn, tokens spread over the pool. The arithmetic is the
 * reference's, operation for operation (softmax with the max subtracted, the sum in expert
 * order, sigmoid as 1 / (1 + exp(-x))), so the ids and weights are the same bits.
 * ---------------------------------------------------------------------------------------- */

/* Whether value a (index ia) ranks before value b (index ib): larger first, a NaN after every
 * number, equal values by the lower index. The order of kern_topk_indices. */
static inline bool ranks_before(float a, int32_t ia, float b, int32_t ib) {
    bool na = isnan(a), nb = isnan(b);
    if (na != nb)
        return nb;
    if (!na && a != b)
        return a > b;
    return ia < ib;
}

/* The k best of v[0..n) among keep[i] (NULL: all), best first; returns how many (< k only
 * when fewer are kept). One pass with an insertion list: O(n) for random data. */
static int32_t topk_insert(const float *v, const bool *keep, int32_t n, int32_t k, int32_t *out) {
    int32_t got = 0;
    for (int32_t i = 0; i < n; i++) {
        if (keep && !keep[i])
            continue;
        if (got == k && !ranks_before(v[i], i, v[out[k - 1]], out[k - 1]))
            continue;
        int32_t pos = got < k ? got : k - 1;
        while (pos > 0 && ranks_before(v[i], i, v[out[pos - 1]], out[pos - 1])) {
            out[pos] = out[pos - 1];
            pos--;
        }
        out[pos] = i;
        if (got < k)
            got++;
    }
    return got;
}

typedef struct route_job {
    const kern_route_params *p;
    const moe_tensor *logits;
    int32_t *ids;
    float *w;
    int64_t T;
    char *scratch; /* per worker: see route_scratch_bytes */
    size_t scratch_per;
    int32_t bad; /* set (to 1) by an item that selected fewer than K experts: a bug */
} route_job;

static size_t route_scratch_bytes(int32_t E, int32_t G, int32_t K) {
    return align64(sizeof(float) * (size_t)E) * 3 + align64(sizeof(bool) * (size_t)E) +
           align64(sizeof(float) * (size_t)G) + align64(sizeof(int32_t) * (size_t)G) +
           align64(sizeof(int32_t) * (size_t)K);
}

static void route_item(void *varg, int64_t item, int32_t worker) {
    route_job *j = varg;
    const kern_route_params *p = j->p;
    const int32_t E = p->n_experts, K = p->top_k;
    const int32_t G = p->group_mode == KERN_GROUP_NONE ? 1 : p->n_group;
    const int32_t per = E / G;
    carver c = {j->scratch + (size_t)worker * j->scratch_per, 0};
    float *logit = carve(&c, sizeof(float) * (size_t)E);
    float *score = carve(&c, sizeof(float) * (size_t)E);
    float *choice = carve(&c, sizeof(float) * (size_t)E);
    bool *keep = carve(&c, sizeof(bool) * (size_t)E);
    float *gscore = carve(&c, sizeof(float) * (size_t)G);
    int32_t *gsel = carve(&c, sizeof(int32_t) * (size_t)G);
    int32_t *sel = carve(&c, sizeof(int32_t) * (size_t)K);
    const size_t es = moe_dtype_size(j->logits->dtype);
    int64_t t0 = item * ROWS_PER_ITEM, t1 = t0 + ROWS_PER_ITEM < j->T ? t0 + ROWS_PER_ITEM : j->T;
    for (int64_t t = t0; t < t1; t++) {
        moe_to_f32(j->logits->dtype, (const char *)j->logits->data + (size_t)t * (size_t)E * es, logit, (size_t)E);
        if (p->scoring == KERN_SCORE_SIGMOID) {
            for (int32_t e = 0; e < E; e++)
                score[e] = 1.0f / (1.0f + expf(-logit[e]));
        } else {
            float m = -INFINITY;
            for (int32_t e = 0; e < E; e++)
                if (logit[e] > m)
                    m = logit[e];
            float sum = 0.0f;
            for (int32_t e = 0; e < E; e++) {
                score[e] = expf(logit[e] - m);
                sum += score[e];
            }
            for (int32_t e = 0; e < E; e++)
                score[e] /= sum;
        }
        for (int32_t e = 0; e < E; e++)
            choice[e] = score[e] + (p->correction_bias ? p->correction_bias[e] : 0.0f);

        const bool *kp = NULL;
        if (G > 1) {
            for (int32_t g = 0; g < G; g++) {
                const float *cg = choice + (size_t)g * (size_t)per;
                if (p->group_mode == KERN_GROUP_MAX) {
                    float m = cg[0];
                    for (int32_t i = 1; i < per; i++)
                        if (cg[i] > m)
                            m = cg[i];
                    gscore[g] = m;
                } else {
                    int32_t top2[2];
                    topk_insert(cg, NULL, per, 2, top2);
                    gscore[g] = cg[top2[0]] + cg[top2[1]];
                }
            }
            topk_insert(gscore, NULL, G, p->topk_group, gsel);
            memset(keep, 0, sizeof(bool) * (size_t)E);
            for (int32_t q = 0; q < p->topk_group; q++)
                memset(keep + (size_t)gsel[q] * (size_t)per, 1, sizeof(bool) * (size_t)per);
            kp = keep;
        }
        if (topk_insert(choice, kp, E, K, sel) != K) {
            j->bad = 1;
            continue;
        }
        float sum = 0.0f;
        for (int32_t k = 0; k < K; k++)
            sum += score[sel[k]];
        for (int32_t k = 0; k < K; k++) {
            float v = score[sel[k]];
            if (p->renormalize && sum > 0.0f)
                v /= sum;
            j->ids[t * K + k] = sel[k];
            j->w[t * K + k] = v * p->routed_scaling_factor;
        }
    }
}

static moe_status fast_route(kern_ctx_t *ctx, const kern_route_params *p, const moe_tensor *logits, moe_tensor *ids,
                             moe_tensor *w) {
    fast_state *st = ctx->impl;
    const int32_t E = p->n_experts, K = p->top_k;
    const int32_t G = p->group_mode == KERN_GROUP_NONE ? 1 : p->n_group;
    const int64_t T = logits->shape[0];
    /* Outputs are written only when the whole call succeeds: results go to scratch first. */
    size_t per = route_scratch_bytes(E, G, K);
    size_t out_ids = align64(sizeof(int32_t) * (size_t)(T * K)), out_w = align64(sizeof(float) * (size_t)(T * K));
    MOE_CHECK(arena_reserve(st, per * (size_t)st->n_threads + out_ids + out_w));
    carver c = {st->arena, 0};
    route_job j = {.p = p, .logits = logits, .T = T, .scratch_per = per};
    j.ids = carve(&c, sizeof(int32_t) * (size_t)(T * K));
    j.w = carve(&c, sizeof(float) * (size_t)(T * K));
    j.scratch = carve(&c, per * (size_t)st->n_threads);
    cpu_pool_run(st->pool, route_item, &j, (T + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM);
    if (j.bad)
        return moe_fail(MOE_ERR_INTERNAL, "route: selected fewer than %d experts", (int)K);
    memcpy(ids->data, j.ids, sizeof(int32_t) * (size_t)(T * K));
    memcpy(w->data, j.w, sizeof(float) * (size_t)(T * K));
    return MOE_OK;
}

/* ------------------------------------------------------------------------------------------
 * Experts. A "unit" is one expert's work: M rows of fp32 input (by pointer), its weights, and
 * where its outputs go. Routed experts and the shared expert are units alike.
 * ---------------------------------------------------------------------------------------- */
typedef struct unit {
    const void *w13;          /* [2I, H] of dt */
    const void *w2;           /* [H, I] of dt */
    int64_t I;
    int64_t M;                /* rows */
    const float *const *rows; /* [M] input rows, H floats each */
    float *a;                 /* [M, I] activations (fp32 holding dt-rounded values) */
    kern_act act;
    /* The down epilogue: out row m goes to dst + dst_row[m] * H (dtype dt), times scale[m]
     * (routing weight, shared gate) unless scale is NULL. */
    void *dst;
    const int32_t *dst_row;
    const float *scale;
} unit;

typedef struct experts_job {
    moe_dtype dt;
    int64_t H;
    const unit *units;
    const int32_t *item_unit;  /* per item: unit index */
    const int32_t *item_panel; /* per item: panel index (gate/up: 16 features, down: 32) */
    float *pack;               /* per worker: 2 panels of 16 x max(H, I) floats */
    size_t pack_per;           /* floats per worker */
} experts_job;

/* Step 2 item: 16 intermediate features of one unit, for all its rows. */
static void gate_up_item(void *varg, int64_t item, int32_t worker) {
    const experts_job *j = varg;
    const unit *u = &j->units[j->item_unit[item]];
    const int64_t H = j->H, I = u->I;
    const int64_t f0 = (int64_t)j->item_panel[item] * CPU_NR;
    const int32_t nr = (int32_t)(I - f0 < CPU_NR ? I - f0 : CPU_NR);
    const size_t es = moe_dtype_size(j->dt);
    float *pg = j->pack + (size_t)worker * j->pack_per;
    float *pu = pg + (size_t)H * CPU_NR;
    cpu_pack_panel(j->dt, (const char *)u->w13 + (size_t)f0 * (size_t)H * es, H, nr, H, pg);
    cpu_pack_panel(j->dt, (const char *)u->w13 + (size_t)(I + f0) * (size_t)H * es, H, nr, H, pu);
    float tg[CPU_MROWS * CPU_NR], tu[CPU_MROWS * CPU_NR];
    for (int64_t m0 = 0; m0 < u->M; m0 += CPU_MROWS) {
        int32_t m = (int32_t)(u->M - m0 < CPU_MROWS ? u->M - m0 : CPU_MROWS);
        cpu_gemm_rows(u->rows + m0, m, pg, pu, H, tg, tu);
        for (int32_t i = 0; i < m; i++) {
            float *arow = u->a + (size_t)(m0 + i) * (size_t)I + (size_t)f0;
            for (int32_t q = 0; q < nr; q++)
                arow[q] = kern_act_f32(u->act, tg[i * CPU_NR + q]) * tu[i * CPU_NR + q];
            round_inplace(j->dt, arow, nr);
        }
    }
}

/* Step 3 item: 32 hidden features (two panels) of one unit, for all its rows. */
static void down_item(void *varg, int64_t item, int32_t worker) {
    const experts_job *j = varg;
    const unit *u = &j->units[j->item_unit[item]];
    const int64_t H = j->H, I = u->I;
    const int64_t h0 = (int64_t)j->item_panel[item] * 2 * CPU_NR;
    const int32_t nr0 = (int32_t)(H - h0 < CPU_NR ? H - h0 : CPU_NR);
    const int64_t rest = H - h0 - CPU_NR; /* features of the second panel */
    const int32_t nr1 = (int32_t)(rest <= 0 ? 0 : rest < CPU_NR ? rest : CPU_NR);
    const size_t es = moe_dtype_size(j->dt);
    float *pd0 = j->pack + (size_t)worker * j->pack_per;
    float *pd1 = pd0 + (size_t)I * CPU_NR;
    cpu_pack_panel(j->dt, (const char *)u->w2 + (size_t)h0 * (size_t)I * es, I, nr0, I, pd0);
    if (nr1 > 0)
        cpu_pack_panel(j->dt, (const char *)u->w2 + (size_t)(h0 + CPU_NR) * (size_t)I * es, I, nr1, I, pd1);
    float to[2][CPU_MROWS * CPU_NR];
    const float *arows[CPU_MROWS];
    for (int64_t m0 = 0; m0 < u->M; m0 += CPU_MROWS) {
        int32_t m = (int32_t)(u->M - m0 < CPU_MROWS ? u->M - m0 : CPU_MROWS);
        for (int32_t i = 0; i < m; i++)
            arows[i] = u->a + (size_t)(m0 + i) * (size_t)I;
        cpu_gemm_rows(arows, m, pd0, nr1 > 0 ? pd1 : NULL, I, to[0], to[1]);
        for (int32_t i = 0; i < m; i++) {
            for (int32_t half = 0; half < (nr1 > 0 ? 2 : 1); half++) {
                int32_t nr = half ? nr1 : nr0;
                size_t base = (size_t)u->dst_row[m0 + i] * (size_t)H + (size_t)(h0 + half * CPU_NR);
                float *o = to[half] + i * CPU_NR;
                if (u->scale) {
                    float s = u->scale[m0 + i];
                    for (int32_t q = 0; q < nr; q++)
                        o[q] = s * o[q];
                }
                moe_from_f32(j->dt, o, (char *)u->dst + base * es, (size_t)nr);
            }
        }
    }
}

/* Scratch of steps 2 and 3 for up to max_units units of intermediate size <= max_i. */
typedef struct units_scratch {
    int32_t *item_unit;
    int32_t *item_panel;
    float *pack;
    size_t pack_per;
} units_scratch;

static void carve_units_scratch(carver *c, int32_t n_threads, int64_t H, int64_t max_i, int64_t max_units,
                                units_scratch *us) {
    int64_t kd = H > max_i ? H : max_i;
    int64_t panels = (kd + CPU_NR - 1) / CPU_NR;
    us->item_unit = carve(c, sizeof(int32_t) * (size_t)(max_units * panels));
    us->item_panel = carve(c, sizeof(int32_t) * (size_t)(max_units * panels));
    us->pack_per = align64(sizeof(float) * 2 * CPU_NR * (size_t)kd) / sizeof(float);
    us->pack = carve(c, sizeof(float) * us->pack_per * (size_t)n_threads);
}

/* Runs steps 2 and 3 over a set of units. */
static void run_units(fast_state *st, moe_dtype dt, int64_t H, const unit *units, int32_t n_units,
                      const units_scratch *us) {
    experts_job j = {.dt = dt,
                     .H = H,
                     .units = units,
                     .item_unit = us->item_unit,
                     .item_panel = us->item_panel,
                     .pack = us->pack,
                     .pack_per = us->pack_per};
    int64_t n = 0;
    for (int32_t u = 0; u < n_units; u++)
        for (int64_t g = 0; g < (units[u].I + CPU_NR - 1) / CPU_NR; g++, n++) {
            us->item_unit[n] = u;
            us->item_panel[n] = (int32_t)g;
        }
    cpu_pool_run(st->pool, gate_up_item, &j, n);
    n = 0;
    for (int32_t u = 0; u < n_units; u++)
        for (int64_t g = 0; g < (H + 2 * CPU_NR - 1) / (2 * CPU_NR); g++, n++) {
            us->item_unit[n] = u;
            us->item_panel[n] = (int32_t)g;
        }
    cpu_pool_run(st->pool, down_item, &j, n);
}

/* Step 0: x rows to fp32 (and the shared gate, and weighted copies). */
typedef struct gather_job {
    moe_dtype dt;
    const void *x;
    int64_t T, H, K;
    float *xf;            /* [T, H] */
    const void *gate;     /* [H] of dt, or NULL */
    float *gate_val;      /* [T] sigmoid(x . gate) */
    bool weight_on_input;
    const int32_t *pair_of_row; /* [P] (weight on input) */
    const float *topk_w;        /* [T, K] */
    float *xw;                  /* [P, H] */
    int64_t P;
} gather_job;

static void gather_item(void *varg, int64_t item, int32_t worker) {
    (void)worker;
    const gather_job *j = varg;
    const size_t es = moe_dtype_size(j->dt);
    int64_t t0 = item * ROWS_PER_ITEM, t1 = t0 + ROWS_PER_ITEM < j->T ? t0 + ROWS_PER_ITEM : j->T;
    for (int64_t t = t0; t < t1; t++) {
        float *h = j->xf + (size_t)t * (size_t)j->H;
        moe_to_f32(j->dt, (const char *)j->x + (size_t)t * (size_t)j->H * es, h, (size_t)j->H);
        if (j->gate) {
            float acc = 0.0f;
            for (int64_t i = 0; i < j->H; i++)
                acc += moe_load_f32(j->dt, j->gate, (size_t)i) * h[i];
            j->gate_val[t] = 1.0f / (1.0f + expf(-acc));
        }
    }
}

static void gather_w_item(void *varg, int64_t item, int32_t worker) {
    (void)worker;
    const gather_job *j = varg;
    int64_t r0 = item * ROWS_PER_ITEM, r1 = r0 + ROWS_PER_ITEM < j->P ? r0 + ROWS_PER_ITEM : j->P;
    for (int64_t r = r0; r < r1; r++) {
        int32_t pair = j->pair_of_row[r];
        int64_t t = pair / j->K;
        float wk = j->topk_w[pair];
        const float *h = j->xf + (size_t)t * (size_t)j->H;
        float *o = j->xw + (size_t)r * (size_t)j->H;
        for (int64_t i0 = 0; i0 < j->H; i0 += 256) {
            int32_t n = (int32_t)(j->H - i0 < 256 ? j->H - i0 : 256);
            for (int32_t i = 0; i < n; i++)
                o[i0 + i] = h[i0 + i] * wk;
            round_inplace(j->dt, o + i0, n);
        }
    }
}

/* Step 4: the fixed-order sum. */
typedef struct sum_job {
    moe_dtype dt;
    int64_t T, K, H;
    const void *slots;      /* [T, K, H] of dt */
    const uint8_t *valid;   /* [T, K] or NULL (all valid) */
    const void *shared;     /* [T, H] of dt or NULL */
    void *y;                /* [T, H] of dt */
} sum_job;

static void sum_item(void *varg, int64_t item, int32_t worker) {
    (void)worker;
    const sum_job *j = varg;
    int64_t t0 = item * ROWS_PER_ITEM, t1 = t0 + ROWS_PER_ITEM < j->T ? t0 + ROWS_PER_ITEM : j->T;
    const size_t es = moe_dtype_size(j->dt);
    float acc[256], v[256];
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t h0 = 0; h0 < j->H; h0 += 256) {
            int64_t nh = j->H - h0 < 256 ? j->H - h0 : 256;
            for (int64_t q = 0; q < nh; q++)
                acc[q] = 0.0f;
            for (int64_t k = 0; k < j->K; k++) {
                /* A slot of an expert held elsewhere is exactly +0.0: adding it changes nothing
                 * (acc is never -0.0), so it is skipped. */
                if (j->valid && !j->valid[t * j->K + k])
                    continue;
                size_t base = (size_t)((t * j->K + k) * j->H + h0);
                moe_to_f32(j->dt, (const char *)j->slots + base * es, v, (size_t)nh);
                for (int64_t q = 0; q < nh; q++)
                    acc[q] += v[q];
            }
            size_t ob = (size_t)(t * j->H + h0);
            if (j->shared) {
                moe_to_f32(j->dt, (const char *)j->shared + ob * es, v, (size_t)nh);
                for (int64_t q = 0; q < nh; q++)
                    acc[q] += v[q];
            }
            moe_from_f32(j->dt, acc, (char *)j->y + ob * es, (size_t)nh);
        }
    }
}

/*
 * One chunk of tokens [t0, t0 + T) through steps 0-4. `y` is the caller's output (sum or slot
 * mode); `se` the shared expert or NULL. With dry, only sizes the scratch (c->used).
 */
static moe_status experts_chunk(fast_state *st, const kern_experts_params *p, const moe_tensor *x,
                                const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *ids,
                                const moe_tensor *w, const kern_shared_expert *se, moe_tensor *y, int64_t t0,
                                int64_t T, carver *c, bool dry) {
    const moe_dtype dt = x->dtype;
    const size_t es = moe_dtype_size(dt);
    const int64_t H = x->shape[1], K = ids->shape[1], I = w13->shape[1] / 2;
    const int32_t n_local = p->n_local;
    const bool slot_mode = y->ndim == 3;
    const int32_t *id = (const int32_t *)ids->data + t0 * K;
    const float *wt = (const float *)w->data + t0 * K;

    float *xf = carve(c, sizeof(float) * (size_t)(T * H));
    int32_t *count = carve(c, sizeof(int32_t) * (size_t)(n_local + 1));
    int32_t *pair_of_row = carve(c, sizeof(int32_t) * (size_t)(T * K));
    uint8_t *valid = carve(c, (size_t)(T * K));
    float *row_w = carve(c, sizeof(float) * (size_t)(T * K));
    const float **rows = carve(c, sizeof(float *) * (size_t)(T * K + (se ? T : 0)));
    float *xw = p->weight_on_input ? carve(c, sizeof(float) * (size_t)(T * K * H)) : NULL;
    float *a = carve(c, sizeof(float) * (size_t)(T * K * I));
    void *slots = slot_mode ? NULL : carve(c, es * (size_t)(T * K * H));
    unit *units = carve(c, sizeof(unit) * (size_t)(n_local + 1));
    int64_t Is = se ? se->w13->shape[0] / 2 : 0;
    float *as = se ? carve(c, sizeof(float) * (size_t)(T * Is)) : NULL;
    void *sbuf = se ? carve(c, es * (size_t)(T * H)) : NULL;
    float *gate_val = se && se->gate ? carve(c, sizeof(float) * (size_t)T) : NULL;
    int32_t *tok_row = se ? carve(c, sizeof(int32_t) * (size_t)T) : NULL;
    units_scratch us;
    int64_t max_units = (n_local < T * K ? n_local : T * K) + (se ? 1 : 0);
    carve_units_scratch(c, st->n_threads, H, I > Is ? I : Is, max_units, &us);
    if (dry)
        return MOE_OK;

    /* 1. permute: counting sort of the pairs by local expert, stable. */
    memset(count, 0, sizeof(int32_t) * (size_t)(n_local + 1));
    int64_t P = 0;
    for (int64_t i = 0; i < T * K; i++) {
        int32_t e = kern_local_slot(p, id[i]);
        valid[i] = e >= 0;
        if (e >= 0) {
            count[e + 1]++;
            P++;
        }
    }
    for (int32_t e = 0; e < n_local; e++)
        count[e + 1] += count[e]; /* count[e] = first row of expert e */
    /* Place pairs; count[e] advances to the end of e's rows, then is shifted back. */
    for (int64_t i = 0; i < T * K; i++) {
        int32_t e = kern_local_slot(p, id[i]);
        if (e >= 0)
            pair_of_row[count[e]++] = (int32_t)i;
    }
    for (int32_t e = n_local; e > 0; e--)
        count[e] = count[e - 1];
    count[0] = 0;

    /* 0. gather. */
    gather_job g = {.dt = dt,
                    .x = (const char *)x->data + (size_t)(t0 * H) * es,
                    .T = T,
                    .H = H,
                    .K = K,
                    .xf = xf,
                    .gate = se && se->gate ? se->gate->data : NULL,
                    .gate_val = gate_val,
                    .weight_on_input = p->weight_on_input,
                    .pair_of_row = pair_of_row,
                    .topk_w = wt,
                    .xw = xw,
                    .P = P};
    cpu_pool_run(st->pool, gather_item, &g, (T + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM);
    if (p->weight_on_input)
        cpu_pool_run(st->pool, gather_w_item, &g, (P + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM);

    /* Units: the shared expert first (the largest), then the experts with rows. */
    void *slot_dst = slot_mode ? (char *)y->data + (size_t)(t0 * K * H) * es : slots;
    int32_t nu = 0;
    if (se) {
        const float **srows = rows + P;
        for (int64_t t = 0; t < T; t++) {
            srows[t] = xf + (size_t)(t * H);
            tok_row[t] = (int32_t)t;
        }
        units[nu++] = (unit){.w13 = se->w13->data,
                             .w2 = se->w2->data,
                             .I = Is,
                             .M = T,
                             .rows = srows,
                             .a = as,
                             .act = se->act,
                             .dst = sbuf,
                             .dst_row = tok_row,
                             .scale = gate_val};
    }
    for (int64_t r = 0; r < P; r++) {
        int32_t pair = pair_of_row[r];
        rows[r] = p->weight_on_input ? xw + (size_t)(r * H) : xf + (size_t)((pair / K) * H);
        row_w[r] = wt[pair];
    }
    const size_t e13 = (size_t)(2 * I * H) * es, e2 = (size_t)(H * I) * es;
    for (int32_t e = 0; e < n_local; e++) {
        int64_t m = count[e + 1] - count[e];
        if (m == 0)
            continue;
        units[nu++] = (unit){.w13 = (const char *)w13->data + (size_t)e * e13,
                             .w2 = (const char *)w2->data + (size_t)e * e2,
                             .I = I,
                             .M = m,
                             .rows = rows + count[e],
                             .a = a + (size_t)count[e] * (size_t)I,
                             .act = p->act,
                             .dst = slot_dst,
                             .dst_row = pair_of_row + count[e],
                             .scale = p->weight_on_input ? NULL : row_w + count[e]};
    }

    /* 2 and 3. */
    run_units(st, dt, H, units, nu, &us);

    /* 4. */
    if (slot_mode) {
        /* Pairs held elsewhere: exactly +0.0 (all-zero bits in every dtype). */
        for (int64_t i = 0; i < T * K; i++)
            if (!valid[i])
                memset((char *)slot_dst + (size_t)(i * H) * es, 0, (size_t)H * es);
    } else {
        sum_job sj = {.dt = dt,
                      .T = T,
                      .K = K,
                      .H = H,
                      .slots = slots,
                      .valid = valid,
                      .shared = sbuf,
                      .y = (char *)y->data + (size_t)(t0 * H) * es};
        cpu_pool_run(st->pool, sum_item, &sj, (T + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM);
    }
    return MOE_OK;
}

static moe_status experts_run(kern_ctx_t *ctx, const kern_experts_params *p, const moe_tensor *x,
                              const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *ids,
                              const moe_tensor *w, const kern_shared_expert *se, moe_tensor *y) {
    fast_state *st = ctx->impl;
    const int64_t T = x->shape[0], K = ids->shape[1];
    int64_t chunk = CHUNK_PAIRS / K;
    if (chunk < 1)
        chunk = 1;
    if (chunk > T)
        chunk = T;
    carver sz = {NULL, 0};
    MOE_CHECK(experts_chunk(st, p, x, w13, w2, ids, w, se, y, 0, chunk, &sz, true));
    MOE_CHECK(arena_reserve(st, sz.used));
    for (int64_t t0 = 0; t0 < T; t0 += chunk) {
        int64_t n = T - t0 < chunk ? T - t0 : chunk;
        carver c = {st->arena, 0};
        MOE_CHECK(experts_chunk(st, p, x, w13, w2, ids, w, se, y, t0, n, &c, false));
    }
    return MOE_OK;
}

static moe_status fast_fused_experts(kern_ctx_t *ctx, const kern_experts_params *p, const moe_tensor *x,
                                     const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *ids,
                                     const moe_tensor *w, moe_tensor *y) {
    return experts_run(ctx, p, x, w13, w2, ids, w, NULL, y);
}

static moe_status fast_moe_forward(kern_ctx_t *ctx, const kern_experts_params *p, const moe_tensor *x,
                                   const moe_tensor *w13, const moe_tensor *w2, const moe_tensor *ids,
                                   const moe_tensor *w, const kern_shared_expert *se, moe_tensor *y) {
    return experts_run(ctx, p, x, w13, w2, ids, w, se, y);
}

/* The shared expert alone: one unit over all tokens, no routed experts. */
static moe_status fast_shared_expert(kern_ctx_t *ctx, const kern_shared_expert *se, const moe_tensor *x,
                                     moe_tensor *s) {
    fast_state *st = ctx->impl;
    const moe_dtype dt = x->dtype;
    const int64_t T = x->shape[0], H = x->shape[1], Is = se->w13->shape[0] / 2;
    for (int pass = 0; pass < 2; pass++) {
        bool dry = pass == 0;
        carver c = {dry ? NULL : st->arena, 0};
        float *xf = carve(&c, sizeof(float) * (size_t)(T * H));
        float *as = carve(&c, sizeof(float) * (size_t)(T * Is));
        float *gate_val = se->gate ? carve(&c, sizeof(float) * (size_t)T) : NULL;
        int32_t *tok_row = carve(&c, sizeof(int32_t) * (size_t)T);
        const float **rows = carve(&c, sizeof(float *) * (size_t)T);
        unit *u = carve(&c, sizeof(unit));
        units_scratch us;
        carve_units_scratch(&c, st->n_threads, H, Is, 1, &us);
        if (dry) {
            MOE_CHECK(arena_reserve(st, c.used));
            continue;
        }
        gather_job g = {.dt = dt, .x = x->data, .T = T, .H = H, .K = 1, .xf = xf,
                        .gate = se->gate ? se->gate->data : NULL, .gate_val = gate_val};
        cpu_pool_run(st->pool, gather_item, &g, (T + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM);
        for (int64_t t = 0; t < T; t++) {
            rows[t] = xf + (size_t)(t * H);
            tok_row[t] = (int32_t)t;
        }
        *u = (unit){.w13 = se->w13->data, .w2 = se->w2->data, .I = Is, .M = T, .rows = rows, .a = as,
                    .act = se->act, .dst = s->data, .dst_row = tok_row, .scale = gate_val};
        run_units(st, dt, H, u, 1, &us);
    }
    return MOE_OK;
}

static moe_status fast_moe_sum(kern_ctx_t *ctx, const moe_tensor *slots, const moe_tensor *shared, moe_tensor *y) {
    fast_state *st = ctx->impl;
    sum_job sj = {.dt = slots->dtype,
                  .T = slots->shape[0],
                  .K = slots->shape[1],
                  .H = slots->shape[2],
                  .slots = slots->data,
                  .valid = NULL,
                  .shared = shared ? shared->data : NULL,
                  .y = y->data};
    cpu_pool_run(st->pool, sum_item, &sj, (sj.T + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM);
    return MOE_OK;
}

const kern_backend_ops kern_cpu_ops = {
    .name = "cpu",
    .host_data = true,
    .init = fast_init,
    .free = fast_free,
    .supports = fast_supports,
    .sync = NULL,
    .route = fast_route,
    .fused_experts = fast_fused_experts,
    .shared_expert = fast_shared_expert,
    .moe_sum = fast_moe_sum,
    .moe_forward = fast_moe_forward,
};
