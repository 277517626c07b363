// Schemas of every op, defined once and compiled into both libraries: `vse_cuda` (_C)
// and the test-only `vse_simt` (_simt), so the two can never drift apart.
// Kernels register themselves next to their code (csrc/cpu/*.cpp, csrc/cuda/*.cu).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(VSE_OPS_NAMESPACE, m) {
  // Streaming top-k of queries·keysᵀ per query row; keys whose label equals the query's
  // label are skipped (labels of size 0 = no labels). Ties: lowest key index first.
  m.def(
      "topk_similar(Tensor queries, Tensor keys, int k, Tensor query_labels, "
      "Tensor key_labels, int row_chunk, int col_chunk) -> (Tensor values, Tensor indices)");

  // In-batch losses over the chunked engine (DESIGN §3): S = img·txtᵀ, positives on the
  // diagonal, labels of size 0 = no labels. Forwards return the loss summed over both
  // directions in the accumulate type (float32 for half inputs) and the state their
  // backward needs; backwards take ∂/∂loss and return (∂/∂img, ∂/∂txt) in the input dtype.
  // anchor_begin, anchor_end: the pairs whose row and column terms count, [0, N) in one
  // process, a rank's own pairs of the gathered batch under group= (vse_cuda.distributed).
  // Triplet, mining "all" | "hardest" | "topk" (k ignored unless "topk"):
  //   "all": saved [N, 2] per row / column anchor, index [N, 0]; otherwise saved [N, w] the
  //   weights of the mined negatives listed in index [N, w] (-1: empty), w = 1 or min(k, N).
  m.def(
      "triplet_forward(Tensor img, Tensor txt, Tensor labels, float margin, str mining, int k, "
      "int anchor_begin, int anchor_end, int row_chunk, int col_chunk) -> (Tensor loss, Tensor row_saved, "
      "Tensor col_saved, Tensor row_index, Tensor col_index)");
  m.def(
      "triplet_backward(Tensor grad, Tensor img, Tensor txt, Tensor labels, float margin, str mining, "
      "Tensor row_saved, Tensor col_saved, Tensor row_index, Tensor col_index, int anchor_begin, "
      "int anchor_end, int row_chunk, int col_chunk) -> (Tensor grad_img, Tensor grad_txt)");
  // Unified loss (spec §4.2): scale a 0-dim floating tensor (read as a double), saved [N, 3]
  // per row / column anchor; with scale_grad the last output is ∂loss/∂scale (0-dim), else 0.
  m.def(
      "unified_forward(Tensor img, Tensor txt, Tensor labels, Tensor scale, float margin, bool scale_grad, "
      "bool label_positives, int anchor_begin, int anchor_end, int row_chunk, int col_chunk) -> (Tensor loss, Tensor row_saved, "
      "Tensor col_saved, Tensor d_scale)");
  m.def(
      "unified_backward(Tensor grad, Tensor img, Tensor txt, Tensor labels, Tensor scale, float margin, "
      "bool label_positives, Tensor row_saved, Tensor col_saved, int anchor_begin, int anchor_end, int row_chunk, "
      "int col_chunk) -> (Tensor grad_img, Tensor grad_txt)");
  // SigLIP loss (spec §8.2): scale and bias 0-dim floating tensors (read as doubles), saved
  // [N, 3] per row / column anchor; d_scale, d_bias = ∂loss/∂scale, ∂loss/∂bias (0-dim).
  m.def(
      "siglip_forward(Tensor img, Tensor txt, Tensor labels, Tensor scale, Tensor bias, int anchor_begin, "
      "int anchor_end, int row_chunk, int col_chunk) -> (Tensor loss, Tensor row_saved, Tensor col_saved, "
      "Tensor d_scale, Tensor d_bias)");
  m.def(
      "siglip_backward(Tensor grad, Tensor img, Tensor txt, Tensor labels, Tensor scale, Tensor bias, "
      "Tensor row_saved, Tensor col_saved, int anchor_begin, int anchor_end, int row_chunk, "
      "int col_chunk) -> (Tensor grad_img, Tensor grad_txt)");
  // AOQ quintuplet loss (spec §3.3): the four offline inputs are [N, D] like img; saved [N, 7]
  // = ∂loss/∂(p, u, w, x, y, q, z) per anchor, row_index / col_index [N, 1] the hardest valid
  // negative of each row / column (-1: none). The backward is sparse (no GEMM).
  m.def(
      "quintuplet_forward(Tensor img, Tensor txt, Tensor off_img, Tensor off_txt, Tensor img2, Tensor txt2, "
      "Tensor labels, float margin_online, float margin_offline, float alpha, float beta, bool detach_weights, "
      "int anchor_begin, int anchor_end, int row_chunk, int col_chunk) -> (Tensor loss, Tensor saved, "
      "Tensor row_index, Tensor col_index)");
  m.def(
      "quintuplet_backward(Tensor grad, Tensor img, Tensor txt, Tensor off_img, Tensor off_txt, Tensor img2, "
      "Tensor txt2, Tensor saved, Tensor row_index, Tensor col_index) -> (Tensor grad_img, Tensor grad_txt, "
      "Tensor grad_off_img, Tensor grad_off_txt, Tensor grad_img2, Tensor grad_txt2)");
  // GOAL (spec §5): loss = Σ (N − P) (the logging value); the backward injects grad times
  // the weighted G, not the derivative of the loss. row_saved / col_saved [N, 2] = the
  // weights of the hardest negative and of the positive, row_index / col_index [N, 1].
  m.def(
      "goal_forward(Tensor img, Tensor txt, Tensor labels, str triplet_weight, str pair_weight, float tau, "
      "float a, float b, float lam, int anchor_begin, int anchor_end, int row_chunk, int col_chunk) -> "
      "(Tensor loss, Tensor row_saved, Tensor col_saved, Tensor row_index, Tensor col_index)");
  m.def(
      "goal_backward(Tensor grad, Tensor img, Tensor txt, Tensor row_saved, Tensor col_saved, Tensor row_index, "
      "Tensor col_index) -> (Tensor grad_img, Tensor grad_txt)");
}

// `import vse_cuda._C` (or `_simt`) dlopens the library, which runs the registrations above.
#define VSE_CONCAT_(a, b) a##b
#define VSE_CONCAT(a, b) VSE_CONCAT_(a, b)
#if defined(VSE_SIMT)
#define VSE_MODULE_NAME _simt
#else
#define VSE_MODULE_NAME _C
#endif
#define VSE_STR_(x) #x
#define VSE_STR(x) VSE_STR_(x)

extern "C" PyObject* VSE_CONCAT(PyInit_, VSE_MODULE_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, VSE_STR(VSE_MODULE_NAME), nullptr, -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
