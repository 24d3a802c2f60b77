/* The CPU dump's targets: the top-k log-softmax and the sampled draws of float32 rows.
 *
 * torch's operators for them cost a small teacher about a third of its forward on a CPU
 * (benchmarks/RESULTS.md, bench_dump_targets): torch.topk walks each row with a scalar partial
 * sort and logsumexp reads it twice more; the draws make a float64 copy and one long chain of
 * dependent additions. Here each row is read from memory once and the vector loops are left only
 * where they must be. Built by logitcache/dumping/native.py with -O3 -ffast-math (which lets GCC
 * vectorise the loops below); checks for NaN and infinity therefore look at the bits, which
 * fast-math cannot assume away. Built with -fopenmp where the compiler has it: then the `*_team`
 * entry points split the rows over the calling thread's OpenMP team (see there).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 16
#define BISECTIONS 12

static inline uint32_t bits_of(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

/* A min-heap of (value, id) on the value, ties broken so that the larger id is "smaller":
 * it leaves first, and equal values keep the lowest ids, as a stable scan would. */
static inline int heap_less(const float *v, const int64_t *id, int64_t a, int64_t b) {
    return v[a] < v[b] || (v[a] == v[b] && id[a] > id[b]);
}

static void sift_down(float *v, int64_t *id, int64_t n, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && heap_less(v, id, l, m)) m = l;
        if (r < n && heap_less(v, id, r, m)) m = r;
        if (m == i) return;
        float tv = v[i]; v[i] = v[m]; v[m] = tv;
        int64_t ti = id[i]; id[i] = id[m]; id[m] = ti;
        i = m;
    }
}

/* Push (value, id) into the k-heap if it beats the heap's smallest. */
static inline void offer(float *hv, int64_t *hi, int64_t k, float value, int64_t id) {
    if (value > hv[0]) { hv[0] = value; hi[0] = id; sift_down(hv, hi, k, 0); }
}

/* The k best of a row by a k-heap over every entry: exact for any k, and what a row gets when
 * its candidates below are too many (a flat row) or the vocabulary has fewer than k blocks. */
static void heap_topk(const float *row, int64_t vocab, int64_t k, float *hv, int64_t *hi) {
    for (int64_t q = 0; q < k; q++) { hv[q] = row[q]; hi[q] = q; }
    for (int64_t q = k / 2 - 1; q >= 0; q--) sift_down(hv, hi, k, q);
    for (int64_t j = k; j < vocab; j++) offer(hv, hi, k, row[j], j);
    for (int64_t n = k - 1; n > 0; n--) {  /* heap sort: smallest to the end, so decreasing */
        float tv = hv[0]; hv[0] = hv[n]; hv[n] = tv;
        int64_t ti = hi[0]; hi[0] = hi[n]; hi[n] = ti;
        sift_down(hv, hi, n, 0);
    }
}

/* exp(x) for x <= 0, not NaN, to about 3e-7 relative: x log2(e) = n + f with n whole and
 * |f| <= 1/2, 2^f from a degree-5 polynomial (fitted here for the least relative error on
 * [-1/2, 1/2], 1.5e-7 with float32 coefficients), n added to its exponent bits. Below -86 it
 * gives about 2^-125 instead of nearly 0: nothing next to a sum that is at least 1. Why not
 * glibc's vector expf: this is about 12 vector operations per 8 entries, and a row's
 * log-sum-exp is the largest part of the kernel's work. */
static inline float exp_nonpositive(float x) {
    float y = x * 1.44269504088896341f;
    y = y > -125.0f ? y : -125.0f;
    float n = rintf(y), f = y - n;
    float p = 1.3276351382955909e-3f;
    p = p * f + 9.675507433712482e-3f;
    p = p * f + 5.550713464617729e-2f;
    p = p * f + 2.4022120237350464e-1f;
    p = p * f + 6.931469440460205e-1f;
    p = p * f + 1.0000001192092896f;
    uint32_t bits = bits_of(p) + ((uint32_t)(int32_t)n << 23);
    memcpy(&p, &bits, sizeof p);
    return p;
}

/* The sum of exp(row[j] - mx), added in LANES fixed partial sums and then in a fixed order, so
 * that it is the same float32 sum whatever vector width the compiler picks for this machine
 * (AVX2 or AVX-512): a cache's bytes then do not depend on it. */
#define LANES 8
_Static_assert(LANES == 8, "the last line of sum_of_exp adds exactly 8 partial sums");
static float sum_of_exp(const float *row, int64_t vocab, float mx) {
    float part[LANES] = {0};
    int64_t full = vocab - vocab % LANES;
    for (int64_t j = 0; j < full; j += LANES)
        for (int q = 0; q < LANES; q++) part[q] += exp_nonpositive(row[j + q] - mx);
    for (int64_t j = full; j < vocab; j++) part[j - full] += exp_nonpositive(row[j] - mx);
    return ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
}

/* Rows [row0, row1) of `x` (rows x vocab, contiguous): `values` (rows x k) the k largest
 * log-probabilities in decreasing order (ties: lower id first), `ids` their ids. A row with a
 * NaN or +inf, or with every entry -inf, gets NaN values (the caller marks it non-finite).
 * `scratch` holds 2 * ceil(vocab / BLOCK) + 8 * k + 2 floats (the block maxima, the candidates'
 * values and ids, the chosen blocks).
 *
 * Why blocks: any `t` that k distinct entries reach is at most the k-th largest entry, so the
 * k best entries are among those >= t, which live in blocks whose maximum is >= t. With the row
 * cut into `blocks` = ceil(vocab / BLOCK) blocks, block b holding the ids b, b + blocks,
 * b + 2 blocks, ... (strided, so that every block's maximum comes from one elementwise maximum
 * of BLOCK slices of the row: vertical vector work, no reductions), the smallest of the maxima
 * of k groups of blocks is such a `t`, and a bisection raises it while k block maxima still
 * reach it. That leaves about k candidates, gathered from about k blocks and ranked by counting
 * (no branches, no sort), not the row. */
void topk_logsoftmax(const float *x, int64_t vocab, int64_t row0, int64_t row1, int64_t k,
                     float *values, int64_t *ids, float *scratch) {
    int64_t blocks = (vocab + BLOCK - 1) / BLOCK;
    int64_t cap = 4 * k;  /* candidates ranked by counting; more fall back to the heap */
    float *bmax = scratch, *cand = scratch + blocks;
    for (int64_t r = row0; r < row1; r++) {
        const float *row = x + r * vocab;
        float *hv = values + r * k;
        int64_t *hi = ids + r * k;
        /* block maxima, and whether any entry is NaN or +inf, read from the bits (fast-math
         * may fold a float comparison with NaN away) */
        uint32_t broken = 0;
        for (int64_t q = 0; q * blocks < vocab; q++) {
            const float *p = row + q * blocks;
            int64_t m = vocab - q * blocks < blocks ? vocab - q * blocks : blocks;
            for (int64_t b = 0; b < m; b++) {
                uint32_t u = bits_of(p[b]);
                broken |= (u & 0x7fffffffu) > 0x7f800000u || u == 0x7f800000u;
                bmax[b] = q == 0 || p[b] > bmax[b] ? p[b] : bmax[b];
            }
        }
        float mx = bmax[0];
        for (int64_t b = 1; b < blocks; b++) mx = bmax[b] > mx ? bmax[b] : mx;
        if (broken || bits_of(mx) == 0xff800000u) {  /* NaN, +inf, or a row of -inf */
            for (int64_t j = 0; j < k; j++) { hv[j] = NAN; hi[j] = j; }
            continue;
        }
        float sum = sum_of_exp(row, vocab, mx);
        int64_t n = 0;
        if (blocks >= k) {
            int64_t group = blocks / k;  /* k groups of `group` blocks, the last one longer */
            float t = INFINITY;
            for (int64_t g = 0; g < k; g++) {
                int64_t end = g == k - 1 ? blocks : (g + 1) * group;
                float m = bmax[g * group];
                for (int64_t b = g * group + 1; b < end; b++) m = bmax[b] > m ? bmax[b] : m;
                t = m < t ? m : t;
            }
            /* raise t while k block maxima still reach it (each is a distinct entry): a
             * bisection of vectorised counts, which leaves about k candidates, not 4k */
            float top = mx;
            for (int it = 0; it < BISECTIONS; it++) {
                float mid = 0.5f * (t + top);
                int64_t reach = 0;
                for (int64_t b = 0; b < blocks; b++) reach += bmax[b] >= mid;
                if (reach >= k) t = mid; else top = mid;
            }
            /* the blocks that can hold one, listed without branches, then their entries
             * >= t appended without branches; a flat row stops at `cap` and takes the heap */
            int32_t *chosen = (int32_t *)(cand + 2 * cap + 2);
            int64_t picked = 0, c = 0;
            for (int64_t b = 0; b < blocks; b++) {
                chosen[picked] = (int32_t)b;
                picked += bmax[b] >= t;
            }
            for (; c < picked && n + BLOCK <= cap + 1; c++) {
                for (int64_t id = chosen[c]; id < vocab; id += blocks) {
                    cand[n] = row[id];
                    cand[cap + 1 + n] = (float)id;  /* ids < 2^24: exact */
                    n += row[id] >= t;
                }
            }
            if (c < picked) n = cap + 1;  /* stopped early: too many candidates */
        }
        if (blocks < k || n > cap) {
            heap_topk(row, vocab, k, hv, hi);
        } else {
            /* rank = how many candidates beat it (larger, or equal with a lower id) */
            const float *cid = cand + cap + 1;
            for (int64_t i = 0; i < n; i++) {
                float v = cand[i], id = cid[i];
                int64_t rank = 0;
                for (int64_t j = 0; j < n; j++)
                    rank += (cand[j] > v) | ((cand[j] == v) & (cid[j] < id));
                if (rank < k) { hv[rank] = v; hi[rank] = (int64_t)id; }
            }
        }
        /* x - max first, which is exact near the top, then the log of the sum, so that
         * log-probs keep float32's precision when the logits are far from 0 (volatile: else
         * fast-math folds the two into x - (max + log sum), rounded at the logits' scale) */
        float log_sum = logf(sum);
        for (int64_t q = 0; q < k; q++) {
            volatile float shifted = hv[q] - mx;
            hv[q] = shifted - log_sum;
        }
    }
}

/* Sampled draws of rows [row0, row1) of `x` (rows x vocab float32, the temperature applied, every
 * row finite): `out` (rows x n) the first id whose cumulative probability exceeds each of the
 * row's `u` (rows x n, in [0, 1)), as logitcache/dumping/sampling.py's `draw` defines it: the
 * float64 running sum C of exp(x - max x), the first v with C[v] > min(u * C[V-1], the float64
 * just below C[V-1]). `scratch` holds vocab + ceil(vocab / BLOCK) + 1 doubles.
 *
 * Why not one running sum: its 8k additions are a chain of dependent adds. Here each block of 16
 * ids gets its own running sum (independent chains, which the CPU overlaps), the block totals a
 * running sum of their own, and C[v] = P[block] + within[v]: the same sum up to float64 rounding
 * (so a draw moves only where u lies within ~1e-16 of a boundary, as between CPU and CUDA), and
 * still non-decreasing, so a binary search over the blocks and a scan of one block find it. */
void sample_rows(const float *x, int64_t vocab, int64_t row0, int64_t row1, const double *u,
                 int64_t n, int64_t *out, double *scratch) {
    int64_t blocks = (vocab + BLOCK - 1) / BLOCK;
    double *within = scratch, *prefix = scratch + vocab;  /* prefix[b]: C before block b */
    for (int64_t r = row0; r < row1; r++) {
        const float *row = x + r * vocab;
        float mx = row[0];
        for (int64_t j = 1; j < vocab; j++) mx = row[j] > mx ? row[j] : mx;
        for (int64_t j = 0; j < vocab; j++) within[j] = exp((double)row[j] - (double)mx);
        prefix[0] = 0.0;
        for (int64_t b = 0; b < blocks; b++) {
            int64_t start = b * BLOCK, stop = start + BLOCK < vocab ? start + BLOCK : vocab;
            double run = 0.0;
            for (int64_t j = start; j < stop; j++) { run += within[j]; within[j] = run; }
            prefix[b + 1] = prefix[b] + run;
        }
        double last = prefix[blocks];
        double below = nextafter(last, 0.0);
        const double *ur = u + r * n;
        int64_t *o = out + r * n;
        for (int64_t d = 0; d < n; d++) {
            double t = ur[d] * last;
            t = t < below ? t : below;
            int64_t lo = 0, hi = blocks - 1;  /* the first block whose end exceeds t */
            while (lo < hi) {
                int64_t mid = (lo + hi) / 2;
                if (prefix[mid + 1] > t) hi = mid; else lo = mid + 1;
            }
            int64_t start = lo * BLOCK, stop = start + BLOCK < vocab ? start + BLOCK : vocab;
            int64_t id = stop - 1;
            for (int64_t j = start; j < stop; j++)
                if (prefix[lo] + within[j] > t) { id = j; break; }
            o[d] = id;
        }
    }
}

#ifdef _OPENMP
#include <omp.h>

/* Rows [0, rows) over `threads` threads of the calling thread's OpenMP team, thread t with
 * `scratch` + t * `scratch_len`. Why a team and not a pool of our own: torch's CPU operators run
 * on OpenMP too, and the process has one libgomp (ours resolves to the one torch loaded), so
 * these are the very workers that ran the teacher's forward a moment ago and are still
 * spinning for their next region. A separate pool's threads would wait for them to give up the
 * cores: on 2 cores, the top-k of 512-row chunks took twice as long that way. */
void topk_logsoftmax_team(const float *x, int64_t vocab, int64_t rows, int64_t k, float *values,
                          int64_t *ids, float *scratch, int64_t scratch_len, int64_t threads) {
#pragma omp parallel num_threads((int)threads)
    {
        int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
        topk_logsoftmax(x, vocab, rows * t / n, rows * (t + 1) / n, k, values, ids,
                        scratch + t * scratch_len);
    }
}

/* `sample_rows` over rows [0, rows), as `topk_logsoftmax_team` splits them. */
void sample_rows_team(const float *x, int64_t vocab, int64_t rows, const double *u, int64_t n,
                      int64_t *out, double *scratch, int64_t scratch_len, int64_t threads) {
#pragma omp parallel num_threads((int)threads)
    {
        int64_t t = omp_get_thread_num(), m = omp_get_num_threads();
        sample_rows(x, vocab, rows * t / m, rows * (t + 1) / m, u, n, out,
                    scratch + t * scratch_len);
    }
}
#endif
