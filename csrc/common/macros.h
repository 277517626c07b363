#pragma once
// VSE_HOST_DEVICE marks math that CPU kernels, CUDA kernels and the SIMT executor share.
#if defined(__CUDACC__)
#define VSE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VSE_HOST_DEVICE inline
#endif
