// Attention of one sequence's new tree nodes over its cached prefix and their own
// ancestors, one thread block per (node, head): 32 lanes by WARPS warps.
//
// The order of every reduction depends only on the keys the node sees, never on what else
// is in the pass: the t-th visible key (prefix first, then ancestors in node order) goes to
// warp t % WARPS, each warp keeps a running softmax over its keys in order, a score is
// summed over the lanes by the same butterfly, and the warps are combined in warp order.
// A node computed alone, in a chain, in any tree or beside other sequences gets the same
// bits.

#define WARPS 16
#define MAX_PER_LANE 8  // head_dim <= 256

extern "C" __global__ void tree_attention(
    const float* __restrict__ q,                // [n][heads][head_dim]
    const float* __restrict__ k,                // [prefix + n][kv_heads][head_dim]
    const float* __restrict__ v,                // [prefix + n][kv_heads][head_dim]
    const unsigned char* __restrict__ visible,  // [n][n]: node i sees node j
    float* __restrict__ out,                    // [n][heads][head_dim]
    int n, int prefix, int heads, int kv_heads, int head_dim, float scale) {
  const int head = blockIdx.x;
  const int node = blockIdx.y;
  const int lane = threadIdx.x;
  const int warp = threadIdx.y;
  const int kv_head = head / (heads / kv_heads);
  const long kv_row = (long)kv_heads * head_dim;
  const int per_lane = (head_dim + 31) / 32;

  float query[MAX_PER_LANE];
  float acc[MAX_PER_LANE];
#pragma unroll
  for (int r = 0; r < MAX_PER_LANE; ++r) {
    const int d = lane + 32 * r;
    query[r] = (r < per_lane && d < head_dim)
                   ? q[((long)node * heads + head) * head_dim + d]
                   : 0.0f;
    acc[r] = 0.0f;
  }
  const float negative_infinity = __int_as_float(0xff800000);
  float running_max = negative_infinity;
  float running_sum = 0.0f;

  // One key: its score, then the running softmax and the weighted values.
  auto attend = [&](long row) {
    const float* key = k + row * kv_row + (long)kv_head * head_dim;
    float partial = 0.0f;
#pragma unroll
    for (int r = 0; r < MAX_PER_LANE; ++r) {
      const int d = lane + 32 * r;
      if (r < per_lane && d < head_dim) partial += query[r] * key[d];
    }
    for (int offset = 16; offset > 0; offset >>= 1)
      partial += __shfl_xor_sync(0xffffffffu, partial, offset);
    const float score = __shfl_sync(0xffffffffu, partial, 0) * scale;
    const float new_max = fmaxf(running_max, score);
    const float correction = expf(running_max - new_max);
    const float weight = expf(score - new_max);
    running_sum = running_sum * correction + weight;
    const float* value = v + row * kv_row + (long)kv_head * head_dim;
#pragma unroll
    for (int r = 0; r < MAX_PER_LANE; ++r) {
      const int d = lane + 32 * r;
      if (r < per_lane && d < head_dim) acc[r] = acc[r] * correction + weight * value[d];
    }
    running_max = new_max;
  };

  for (int row = warp; row < prefix; row += WARPS) attend(row);
  int ordinal = prefix;
  for (int u = 0; u <= node; ++u) {
    if (!visible[(long)node * n + u]) continue;
    if (ordinal % WARPS == warp) attend((long)prefix + u);
    ++ordinal;
  }

  __shared__ float warp_max[WARPS];
  __shared__ float warp_sum[WARPS];
  __shared__ float warp_acc[WARPS][MAX_PER_LANE * 32];
  if (lane == 0) {
    warp_max[warp] = running_max;
    warp_sum[warp] = running_sum;
  }
#pragma unroll
  for (int r = 0; r < MAX_PER_LANE; ++r) warp_acc[warp][lane + 32 * r] = acc[r];
  __syncthreads();
  if (warp != 0) return;
  // Every node sees itself, so some warp has a finite maximum.
  float top = negative_infinity;
  for (int w = 0; w < WARPS; ++w) top = fmaxf(top, warp_max[w]);
  float total = 0.0f;
  float result[MAX_PER_LANE];
#pragma unroll
  for (int r = 0; r < MAX_PER_LANE; ++r) result[r] = 0.0f;
  for (int w = 0; w < WARPS; ++w) {
    const float c = warp_sum[w] > 0.0f ? expf(warp_max[w] - top) : 0.0f;
    total += warp_sum[w] * c;
#pragma unroll
    for (int r = 0; r < MAX_PER_LANE; ++r) result[r] += warp_acc[w][lane + 32 * r] * c;
  }
#pragma unroll
  for (int r = 0; r < MAX_PER_LANE; ++r) {
    const int d = lane + 32 * r;
    if (r < per_lane && d < head_dim)
      out[((long)node * heads + head) * head_dim + d] = result[r] / total;
  }
}
