// CUDA kernel bodies for kedit::cov_accumulate_: a masked symmetric rank-k update (SYRK) that computes
// only the output tiles on or above the diagonal. Needs only CUDA's own headers.
//
// Shared by both kernels:
//  * one thread block owns one output tile (ti <= tj) and one slice of the selected rows (split-K, so
//    that enough blocks exist to fill the GPU when d is small); several slices of one tile add into
//    the accumulator atomically, a single slice adds without atomics;
//  * rows are gathered through the index list, so padding rows are never loaded;
//  * products are summed in float32 registers and flushed into the accumulator (float64 or float32)
//    every kFlushRows rows and at the end, so no float32 partial sum runs over more than kFlushRows
//    products whatever the batch size; only elements on or above the diagonal are written.
//
// Kernels:
//  * bf16/fp16 inputs (compute capability >= 8.0 / 7.0): tensor cores through WMMA (16x16x16 bf16/fp16
//    products, float32 accumulation; bf16 x bf16 and fp16 x fp16 products are exact in float32). A
//    block of 8 warps owns a 128x128 tile; each warp a 64x32 part (4x2 fragments).
//  * float32 inputs (and older GPUs): SIMT, a 64x64 tile per block of 16x16 threads, 4x4 outputs per
//    thread, fmaf in float32 (no TF32: float32 keys keep float32 products).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "cov_accumulate_cuda.h"

namespace kedit {
namespace cuda {
namespace {

constexpr int64_t kFlushRows = 4096;  // float32 partial sums never cover more rows than this

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void add_to(float* p, float v, bool atomic) {
  if (atomic) atomicAdd(p, v); else *p += v;
}
__device__ __forceinline__ void add_to(double* p, float v, bool atomic) {
  if (atomic) atomicAdd(p, static_cast<double>(v)); else *p += static_cast<double>(v);
}

// Maps a linear index over the upper-triangular tile pairs to (ti, tj), ti <= tj (row-major order).
__device__ __forceinline__ void tile_coords(int linear, int n_tiles, int* ti, int* tj) {
  int row = 0;
  int remaining = linear;
  while (remaining >= n_tiles - row) {
    remaining -= n_tiles - row;
    ++row;
  }
  *ti = row;
  *tj = row + remaining;
}

// ------------------------------------------------------------------------------------------------
// SIMT kernel (float32 inputs, or any input on GPUs without the needed tensor cores).
// ------------------------------------------------------------------------------------------------
constexpr int kSimtTile = 64;
constexpr int kSimtRows = 16;   // rows staged per shared-memory step
constexpr int kSimtEdge = 16;   // 16 x 16 threads
constexpr int kSimtMicro = kSimtTile / kSimtEdge;  // 4 x 4 outputs per thread
static_assert(kFlushRows % kSimtRows == 0, "flushes happen at step boundaries");

template <typename T, typename Acc>
__global__ void __launch_bounds__(kSimtEdge * kSimtEdge)
syrk_upper_simt(const T* __restrict__ x, int64_t row_stride, int64_t d, const int64_t* __restrict__ rows,
                int64_t n_selected, int64_t rows_per_split, Acc* __restrict__ acc, int n_tiles) {
  __shared__ float panel_i[kSimtRows][kSimtTile];
  __shared__ float panel_j[kSimtRows][kSimtTile];

  int ti, tj;
  tile_coords(static_cast<int>(blockIdx.x), n_tiles, &ti, &tj);
  const int64_t col_i0 = static_cast<int64_t>(ti) * kSimtTile;
  const int64_t col_j0 = static_cast<int64_t>(tj) * kSimtTile;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r_end = min(n_selected, r_begin + rows_per_split);
  const bool atomic = gridDim.y > 1;

  const int tx = threadIdx.x;  // output columns tx, tx + 16, tx + 32, tx + 48 of the tile
  const int ty = threadIdx.y;  // output rows    ty, ty + 16, ty + 32, ty + 48
  const int linear_tid = ty * kSimtEdge + tx;

  float sums[kSimtMicro][kSimtMicro];
#pragma unroll
  for (int a = 0; a < kSimtMicro; ++a)
#pragma unroll
    for (int b = 0; b < kSimtMicro; ++b) sums[a][b] = 0.f;

  auto flush = [&]() {
#pragma unroll
    for (int a = 0; a < kSimtMicro; ++a) {
      const int64_t gi = col_i0 + ty + a * kSimtEdge;
#pragma unroll
      for (int b = 0; b < kSimtMicro; ++b) {
        const int64_t gj = col_j0 + tx + b * kSimtEdge;
        if (gi < d && gj < d && gj >= gi) add_to(acc + gi * d + gj, sums[a][b], atomic);  // upper triangle only
        sums[a][b] = 0.f;
      }
    }
  };

  int64_t since_flush = 0;
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kSimtRows) {
    // 256 threads stage 16 rows x 64 columns of both panels: 4 elements of each per thread, consecutive
    // threads on consecutive columns (coalesced).
#pragma unroll
    for (int e = 0; e < (kSimtRows * kSimtTile) / (kSimtEdge * kSimtEdge); ++e) {
      const int flat = e * kSimtEdge * kSimtEdge + linear_tid;
      const int k = flat / kSimtTile;
      const int c = flat % kSimtTile;
      const int64_t r = r0 + k;
      float vi = 0.f, vj = 0.f;
      if (r < r_end) {
        const int64_t src_row = rows != nullptr ? rows[r] : r;
        const T* row_ptr = x + src_row * row_stride;
        if (col_i0 + c < d) vi = to_float(row_ptr[col_i0 + c]);
        if (col_j0 + c < d) vj = to_float(row_ptr[col_j0 + c]);
      }
      panel_i[k][c] = vi;
      panel_j[k][c] = vj;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSimtRows; ++k) {
      float a_vals[kSimtMicro], b_vals[kSimtMicro];
      // Strided micro-tiles: a warp's 16 tx read 16 consecutive floats (no bank conflicts).
#pragma unroll
      for (int a = 0; a < kSimtMicro; ++a) a_vals[a] = panel_i[k][ty + a * kSimtEdge];
#pragma unroll
      for (int b = 0; b < kSimtMicro; ++b) b_vals[b] = panel_j[k][tx + b * kSimtEdge];
#pragma unroll
      for (int a = 0; a < kSimtMicro; ++a)
#pragma unroll
        for (int b = 0; b < kSimtMicro; ++b) sums[a][b] = fmaf(a_vals[a], b_vals[b], sums[a][b]);
    }
    __syncthreads();
    since_flush += kSimtRows;
    if (since_flush == kFlushRows) {
      flush();
      since_flush = 0;
    }
  }
  if (since_flush > 0) flush();
}

// ------------------------------------------------------------------------------------------------
// Tensor-core kernel (bf16 / fp16 inputs).
// ------------------------------------------------------------------------------------------------
constexpr int kTcTile = 128;             // output tile edge
constexpr int kTcRows = 32;              // rows (the GEMM's K) staged per step
constexpr int kTcLd = kTcTile + 8;       // padded shared-memory row (elements): fewer bank conflicts,
                                         // and a multiple of 8 as WMMA requires for 16-bit types
constexpr int kTcWarps = 8;              // 2 (tile rows) x 4 (tile columns) warps
constexpr int kTcThreads = kTcWarps * 32;
constexpr int kWarpRows = 64;            // each warp: 64 x 32 outputs = 4 x 2 fragments of 16 x 16
constexpr int kWarpCols = 32;
constexpr int kFragRows = kWarpRows / 16;
constexpr int kFragCols = kWarpCols / 16;
static_assert(kFlushRows % kTcRows == 0, "flushes happen at step boundaries");
static_assert((kTcRows * kTcTile) % (kTcThreads * 8) == 0, "vector loads cover the panel exactly");

template <typename T> struct TensorCoreArch;  // lowest compute capability (x10) with WMMA for T
template <> struct TensorCoreArch<__half> { static constexpr int value = 700; };
template <> struct TensorCoreArch<__nv_bfloat16> { static constexpr int value = 800; };

template <typename T> __device__ __forceinline__ T zero_of();
template <> __device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.f); }

template <typename T, typename Acc>
__global__ void __launch_bounds__(kTcThreads)
syrk_upper_wmma(const T* __restrict__ x, int64_t row_stride, int64_t d, const int64_t* __restrict__ rows,
                int64_t n_selected, int64_t rows_per_split, Acc* __restrict__ acc, int n_tiles, bool vector_loads) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  if constexpr (TensorCoreArch<T>::value > __CUDA_ARCH__) {
    __trap();  // the launcher never picks this kernel on such a GPU
  } else {
    using namespace nvcuda;
    // panel_i[k][c] = x[row k, col_i0 + c] is A^T staged row by row, i.e. A (= X^T restricted to the
    // tile's rows) in column-major order with leading dimension kTcLd; panel_j[k][c] is B = X in
    // row-major order. Then C = A B = sum_k X[k, i] X[k, j].
    __shared__ __align__(128) T panel_i[kTcRows][kTcLd];
    __shared__ __align__(128) T panel_j[kTcRows][kTcLd];
    __shared__ __align__(128) float staging[kTcWarps][16 * 16];

    int ti, tj;
    tile_coords(static_cast<int>(blockIdx.x), n_tiles, &ti, &tj);
    const int64_t col_i0 = static_cast<int64_t>(ti) * kTcTile;
    const int64_t col_j0 = static_cast<int64_t>(tj) * kTcTile;
    const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
    const int64_t r_end = min(n_selected, r_begin + rows_per_split);
    const bool atomic = gridDim.y > 1;

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int warp_row0 = (warp / 4) * kWarpRows;  // within the tile
    const int warp_col0 = (warp % 4) * kWarpCols;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c_frag[kFragRows][kFragCols];
#pragma unroll
    for (int a = 0; a < kFragRows; ++a)
#pragma unroll
      for (int b = 0; b < kFragCols; ++b) wmma::fill_fragment(c_frag[a][b], 0.f);

    auto flush = [&]() {
      float* stage = staging[warp];
#pragma unroll
      for (int a = 0; a < kFragRows; ++a) {
#pragma unroll
        for (int b = 0; b < kFragCols; ++b) {
          wmma::store_matrix_sync(stage, c_frag[a][b], 16, wmma::mem_row_major);
          __syncwarp();
          const int64_t gi0 = col_i0 + warp_row0 + a * 16;
          const int64_t gj0 = col_j0 + warp_col0 + b * 16;
          for (int e = lane; e < 256; e += 32) {
            const int64_t gi = gi0 + e / 16;
            const int64_t gj = gj0 + e % 16;
            if (gi < d && gj < d && gj >= gi) add_to(acc + gi * d + gj, stage[e], atomic);  // upper only
          }
          __syncwarp();
          wmma::fill_fragment(c_frag[a][b], 0.f);
        }
      }
    };

    const T zero = zero_of<T>();
    int64_t since_flush = 0;
    for (int64_t r0 = r_begin; r0 < r_end; r0 += kTcRows) {
      if (vector_loads) {
        // 16-byte loads of 8 elements: 32 rows x 128 columns = 512 vectors per panel, 2 per thread.
        // (The launcher checked alignment and that d is a multiple of 8, so a vector is all in or out.)
#pragma unroll
        for (int e = 0; e < (kTcRows * kTcTile) / (kTcThreads * 8); ++e) {
          const int v = e * kTcThreads + tid;
          const int k = v / (kTcTile / 8);
          const int c = (v % (kTcTile / 8)) * 8;
          const int64_t r = r0 + k;
          uint4 vi = make_uint4(0u, 0u, 0u, 0u), vj = make_uint4(0u, 0u, 0u, 0u);
          if (r < r_end) {
            const T* row_ptr = x + (rows != nullptr ? rows[r] : r) * row_stride;
            if (col_i0 + c < d) vi = *reinterpret_cast<const uint4*>(row_ptr + col_i0 + c);
            if (col_j0 + c < d) vj = *reinterpret_cast<const uint4*>(row_ptr + col_j0 + c);
          }
          *reinterpret_cast<uint4*>(&panel_i[k][c]) = vi;
          *reinterpret_cast<uint4*>(&panel_j[k][c]) = vj;
        }
      } else {
        for (int e = tid; e < kTcRows * kTcTile; e += kTcThreads) {
          const int k = e / kTcTile;
          const int c = e % kTcTile;
          const int64_t r = r0 + k;
          T vi = zero, vj = zero;
          if (r < r_end) {
            const T* row_ptr = x + (rows != nullptr ? rows[r] : r) * row_stride;
            if (col_i0 + c < d) vi = row_ptr[col_i0 + c];
            if (col_j0 + c < d) vj = row_ptr[col_j0 + c];
          }
          panel_i[k][c] = vi;
          panel_j[k][c] = vj;
        }
      }
      __syncthreads();
#pragma unroll
      for (int k0 = 0; k0 < kTcRows; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a_frag[kFragRows];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b_frag[kFragCols];
#pragma unroll
        for (int a = 0; a < kFragRows; ++a)
          wmma::load_matrix_sync(a_frag[a], &panel_i[k0][warp_row0 + a * 16], kTcLd);
#pragma unroll
        for (int b = 0; b < kFragCols; ++b)
          wmma::load_matrix_sync(b_frag[b], &panel_j[k0][warp_col0 + b * 16], kTcLd);
#pragma unroll
        for (int a = 0; a < kFragRows; ++a)
#pragma unroll
          for (int b = 0; b < kFragCols; ++b) wmma::mma_sync(c_frag[a][b], a_frag[a], b_frag[b], c_frag[a][b]);
      }
      __syncthreads();
      since_flush += kTcRows;
      if (since_flush == kFlushRows) {
        flush();
        since_flush = 0;
      }
    }
    if (since_flush > 0) flush();
  }
#else
  __trap();  // compiled for a GPU without tensor cores; the launcher never picks this kernel there
#endif
}

// ------------------------------------------------------------------------------------------------
// Launch.
// ------------------------------------------------------------------------------------------------

// Rows per split: about two blocks per SM in total, never slices thinner than 256 rows, a whole
// number of steps per slice.
int64_t rows_per_split_for(int64_t n_selected, int64_t upper_tiles, int sm_count, int step, int64_t* splits_out) {
  const int64_t target_blocks = 2LL * (sm_count > 0 ? sm_count : 80);
  int64_t splits = (target_blocks + upper_tiles - 1) / upper_tiles;
  const int64_t max_splits = (n_selected + 255) / 256;
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  if (splits > 65535) splits = 65535;
  int64_t rows_per_split = (n_selected + splits - 1) / splits;
  rows_per_split = ((rows_per_split + step - 1) / step) * step;
  *splits_out = (n_selected + rows_per_split - 1) / rows_per_split;
  return rows_per_split;
}

template <typename T, typename Acc>
cudaError_t launch_simt(const void* x, int64_t row_stride, int64_t d, const int64_t* rows, int64_t n_selected,
                        void* acc, int sm_count, cudaStream_t stream) {
  const int n_tiles = static_cast<int>((d + kSimtTile - 1) / kSimtTile);
  const int64_t upper_tiles = static_cast<int64_t>(n_tiles) * (n_tiles + 1) / 2;
  int64_t splits = 1;
  const int64_t rows_per_split = rows_per_split_for(n_selected, upper_tiles, sm_count, kSimtRows, &splits);
  dim3 grid(static_cast<unsigned>(upper_tiles), static_cast<unsigned>(splits));
  dim3 block(kSimtEdge, kSimtEdge);
  syrk_upper_simt<T, Acc><<<grid, block, 0, stream>>>(static_cast<const T*>(x), row_stride, d, rows, n_selected,
                                                      rows_per_split, static_cast<Acc*>(acc), n_tiles);
  return cudaGetLastError();
}

template <typename T, typename Acc>
cudaError_t launch_wmma(const void* x, int64_t row_stride, int64_t d, const int64_t* rows, int64_t n_selected,
                        void* acc, int sm_count, cudaStream_t stream) {
  const int n_tiles = static_cast<int>((d + kTcTile - 1) / kTcTile);
  const int64_t upper_tiles = static_cast<int64_t>(n_tiles) * (n_tiles + 1) / 2;
  int64_t splits = 1;
  const int64_t rows_per_split = rows_per_split_for(n_selected, upper_tiles, sm_count, kTcRows, &splits);
  const bool vector_loads = d % 8 == 0 && row_stride % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  dim3 grid(static_cast<unsigned>(upper_tiles), static_cast<unsigned>(splits));
  syrk_upper_wmma<T, Acc><<<grid, kTcThreads, 0, stream>>>(static_cast<const T*>(x), row_stride, d, rows,
                                                          n_selected, rows_per_split, static_cast<Acc*>(acc),
                                                          n_tiles, vector_loads);
  return cudaGetLastError();
}

template <typename Acc>
cudaError_t dispatch_input(const void* x, InputType x_type, int64_t row_stride, int64_t d, const int64_t* rows,
                           int64_t n_selected, void* acc, int sm_count, int capability, cudaStream_t stream) {
  switch (x_type) {
    case InputType::kFloat32:
      return launch_simt<float, Acc>(x, row_stride, d, rows, n_selected, acc, sm_count, stream);
    case InputType::kFloat16:
      return capability >= TensorCoreArch<__half>::value
                 ? launch_wmma<__half, Acc>(x, row_stride, d, rows, n_selected, acc, sm_count, stream)
                 : launch_simt<__half, Acc>(x, row_stride, d, rows, n_selected, acc, sm_count, stream);
    case InputType::kBFloat16:
      return capability >= TensorCoreArch<__nv_bfloat16>::value
                 ? launch_wmma<__nv_bfloat16, Acc>(x, row_stride, d, rows, n_selected, acc, sm_count, stream)
                 : launch_simt<__nv_bfloat16, Acc>(x, row_stride, d, rows, n_selected, acc, sm_count, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t cov_accumulate_launch(const void* x, InputType x_type, int64_t row_stride, int64_t d,
                                  const int64_t* rows, int64_t n_selected, void* acc, bool acc_is_double,
                                  int sm_count, cudaStream_t stream) {
  if (n_selected <= 0 || d <= 0) return cudaSuccess;
  int device = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return err;
  const int capability = major * 100 + minor * 10;
  return acc_is_double
             ? dispatch_input<double>(x, x_type, row_stride, d, rows, n_selected, acc, sm_count, capability, stream)
             : dispatch_input<float>(x, x_type, row_stride, d, rows, n_selected, acc, sm_count, capability, stream);
}

}  // namespace cuda
}  // namespace kedit
