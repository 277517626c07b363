#pragma once
// The op namespace of the library being compiled: `vse_cuda` for the product (_C),
// `vse_simt` for the test-only build of csrc/cuda under the SIMT executor (_simt).
#if defined(VSE_SIMT)
#define VSE_OPS_NAMESPACE vse_simt
#else
#define VSE_OPS_NAMESPACE vse_cuda
#endif
