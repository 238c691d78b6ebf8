/* A stand-in for libcuda.so.1 that runs nothing: it records what kernels/batch_launch.c asks of
 * the driver, so its graph path (build, re-point, fall back) is tested without a GPU
 * (tests/test_batch_launch.py). Structs are read at their CUDA 12 offsets. */
#include <stddef.h>
#include <stdint.h>

int launches, nodes_added, node_updates, graph_launches, instantiations;
int capturing;          /* what cuStreamIsCapturing reports (1: active) */
int fail_add_node;      /* a CUresult for cuGraphAddKernelNode to return, 0: success */
int fail_update;        /* the same for cuGraphExecKernelNodeSetParams */
uint64_t last_param0;   /* the first parameter of the last launch or node written */
static int object;

static void record(void **params) { last_param0 = params ? *(uint64_t *)params[0] : 0; }
int cuGetErrorString(int error, const char **text) { *text = "stub"; return 0; }
int cuCtxGetCurrent(void **context) { *context = &object; return 0; }
int cuCtxSetCurrent(void *context) { return 0; }
int cuDeviceGet(int *device, int ordinal) { *device = ordinal; return 0; }
int cuDevicePrimaryCtxRetain(void **context, int device) { *context = &object; return 0; }
int cuLaunchKernelEx(const void *config, void *function, void **params, void **extra) {
  launches++;
  record(params);
  return 0;
}
int cuStreamIsCapturing(void *stream, int *status) { *status = capturing; return 0; }
int cuGraphCreate(void **graph, unsigned flags) { *graph = &object; return 0; }
int cuGraphAddKernelNode_v2(void **node, void *graph, void **deps, size_t n_deps, void **params) {
  if (fail_add_node) return fail_add_node;
  nodes_added++;
  record((void **)params[5]);   /* kernelParams: after func, seven 4-byte fields and padding */
  *node = &object;
  return 0;
}
int cuGraphInstantiateWithFlags(void **exec, void *graph, unsigned long long flags) {
  instantiations++;
  *exec = &object;
  return 0;
}
int cuGraphExecKernelNodeSetParams_v2(void *exec, void *node, void **params) {
  if (fail_update) return fail_update;
  node_updates++;
  record((void **)params[5]);
  return 0;
}
int cuGraphLaunch(void *exec, void *stream) { graph_launches++; return 0; }
int cuGraphExecDestroy(void *exec) { return 0; }
int cuGraphDestroy(void *graph) { return 0; }
