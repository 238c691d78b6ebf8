/* A planned call's kernel launches in one call from Python (see batch_launch.py).
 *
 * build(steps) packs each recorded launch once: its CUfunction, grid, block, shared memory,
 * launch attributes, and its parameters in 8-byte slots (the driver reads each parameter's
 * own size from its slot; values are stored little-endian, so the low bytes are the value).
 * launch(batch, stream, values) copies each step's slots, writes values[role] + offset into
 * the patched ones (data pointers, the seed), and calls cuLaunchKernelEx: one Python call,
 * no argument parsing per launch. A batch is read-only after build, so threads may launch
 * it at once; the GIL is released around the driver calls.
 *
 * A batch built with graphed=1 launches its steps as one CUDA graph instead: a chain of kernel
 * nodes, instantiated on the first launch, whose parameters each launch re-points
 * (cuGraphExecKernelNodeSetParams, which copies them: a launch's values never reach another's)
 * before one cuGraphLaunch. A node update costs a fraction of a kernel launch (H100:
 * perf/graph_update_probe.py). The update and the launch hold the batch's mutex, so threads
 * sharing a batch launch whole, self-consistent graphs. A stream that is capturing (a caller's
 * own CUDA graph) gets plain launches, and so does every later launch once building or
 * updating the graph failed (graph_state() tells which path a batch is on).
 *
 * libcuda is opened with dlopen on the first launch, so the module builds and its packing
 * can be checked (patched()) on a machine without CUDA.
 */
#include "cuda.h"
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define MAX_PARAMS 128
#define MAX_VALUES 64

typedef struct {
  uint32_t slot, role;
  int64_t offset;
} Patch;

typedef struct {
  CUfunction function;
  unsigned grid[3], block, shared;
  int pdl, cooperative;
  uint32_t n_slots, n_patches;
  uint64_t *slots;
  Patch *patches;
} Step;

enum { GRAPH_OFF = -1, GRAPH_UNBUILT = 0, GRAPH_READY = 1 };

typedef struct {
  int device;
  uint32_t n_steps, n_roles;
  Step *steps;
  int graph_state;      /* GRAPH_OFF: plain launches; the graph is built on the first launch */
  CUresult graph_error; /* what dropped the graph (building or updating it), else CUDA_SUCCESS */
  int graph_step;       /* the step whose node failed; n_steps: instantiating the graph */
  uint64_t last[MAX_VALUES];   /* the values the graph's nodes hold (set by the last launch) */
  CUgraph graph;
  CUgraphExec exec;
  CUgraphNode *nodes;   /* per step; NULL for a step with an empty grid (never launched) */
  pthread_mutex_t lock;
} Batch;

typedef CUresult (*launch_ex_t)(const CUlaunchConfig *, CUfunction, void **, void **);
typedef CUresult (*error_string_t)(CUresult, const char **);
typedef CUresult (*ctx_get_t)(CUcontext *);
typedef CUresult (*ctx_set_t)(CUcontext);
typedef CUresult (*device_get_t)(CUdevice *, int);
typedef CUresult (*retain_t)(CUcontext *, CUdevice);
typedef CUresult (*is_capturing_t)(CUstream, CUstreamCaptureStatus *);
typedef CUresult (*graph_create_t)(CUgraph *, unsigned);
typedef CUresult (*add_kernel_node_t)(CUgraphNode *, CUgraph, const CUgraphNode *, size_t,
                                      const CUDA_KERNEL_NODE_PARAMS_v2 *);
typedef CUresult (*instantiate_t)(CUgraphExec *, CUgraph, unsigned long long);
typedef CUresult (*set_params_t)(CUgraphExec, CUgraphNode, const CUDA_KERNEL_NODE_PARAMS_v2 *);
typedef CUresult (*graph_launch_t)(CUgraphExec, CUstream);
typedef CUresult (*exec_destroy_t)(CUgraphExec);
typedef CUresult (*graph_destroy_t)(CUgraph);

static launch_ex_t launch_ex;
static error_string_t error_string;
static ctx_get_t ctx_get;
static ctx_set_t ctx_set;
static device_get_t device_get;
static retain_t primary_retain;
static int have_graphs;   /* every function of graph_symbols found */
static is_capturing_t is_capturing;
static graph_create_t graph_create;
static add_kernel_node_t add_kernel_node;
static instantiate_t instantiate;
static set_params_t set_params;
static graph_launch_t graph_launch;
static exec_destroy_t exec_destroy;
static graph_destroy_t graph_destroy;

/* Where each driver function goes, by its name in libcuda: those every launch needs, and those
   of CUDA graphs (all found, or graphed batches launch plainly). */
typedef struct {
  void **slot;
  const char *name;
} Symbol;

static const Symbol required[] = {
    {(void **)&error_string, "cuGetErrorString"},  {(void **)&ctx_get, "cuCtxGetCurrent"},
    {(void **)&ctx_set, "cuCtxSetCurrent"},        {(void **)&device_get, "cuDeviceGet"},
    {(void **)&primary_retain, "cuDevicePrimaryCtxRetain"},
};
static const Symbol graph_symbols[] = {
    {(void **)&is_capturing, "cuStreamIsCapturing"},
    {(void **)&graph_create, "cuGraphCreate"},
    {(void **)&add_kernel_node, "cuGraphAddKernelNode_v2"},
    {(void **)&instantiate, "cuGraphInstantiateWithFlags"},
    {(void **)&set_params, "cuGraphExecKernelNodeSetParams_v2"},
    {(void **)&graph_launch, "cuGraphLaunch"},
    {(void **)&exec_destroy, "cuGraphExecDestroy"},
    {(void **)&graph_destroy, "cuGraphDestroy"},
};

/* Looks up every symbol of a table (POSIX: a function pointer stored through void **); 1 if all were found. */
static int load_symbols(void *lib, const Symbol *symbols, size_t count) {
  int all = 1;
  for (size_t i = 0; i < count; i++) {
    *symbols[i].slot = dlsym(lib, symbols[i].name);
    all &= *symbols[i].slot != NULL;
  }
  return all;
}

static int load_driver(void) {
  if (launch_ex) return 1;
  void *lib = dlopen("libcuda.so.1", RTLD_LAZY);
  if (!lib) {
    PyErr_SetString(PyExc_RuntimeError, "batch_launch: cannot open libcuda.so.1");
    return 0;
  }
  int found_all = load_symbols(lib, required, sizeof required / sizeof *required);
  have_graphs = load_symbols(lib, graph_symbols, sizeof graph_symbols / sizeof *graph_symbols);
  launch_ex_t found;
  *(void **)&found = dlsym(lib, "cuLaunchKernelEx");
  if (!(found_all && found)) {
    PyErr_SetString(PyExc_RuntimeError, "batch_launch: libcuda.so.1 lacks a driver function it needs");
    return 0;
  }
  launch_ex = found;   /* last: another thread reads it as "all loaded" */
  return 1;
}

/* A graphed batch's graph, destroyed: plain launches from then on. */
static void drop_graph(Batch *batch) {
  if (batch->exec) exec_destroy(batch->exec);   /* errors ignored: a context torn down at exit */
  if (batch->graph) graph_destroy(batch->graph);
  batch->exec = NULL;
  batch->graph = NULL;
  batch->graph_state = GRAPH_OFF;
}

/* Frees a batch and the buffers of its first ``steps`` steps (zeroed when allocated: a step
 * left half-built by a failed build() frees what it holds). */
static void destroy(Batch *batch, Py_ssize_t steps) {
  if (batch->nodes) {   /* a graphed batch: its mutex was initialised first */
    drop_graph(batch);
    pthread_mutex_destroy(&batch->lock);
    PyMem_Free(batch->nodes);
  }
  for (Py_ssize_t i = 0; i < steps; i++) {
    PyMem_Free(batch->steps[i].slots);
    PyMem_Free(batch->steps[i].patches);
  }
  PyMem_Free(batch->steps);
  PyMem_Free(batch);
}

static void free_batch(PyObject *capsule) {
  Batch *batch = (Batch *)PyCapsule_GetPointer(capsule, "tritonkv.batch");
  if (batch) destroy(batch, batch->n_steps);
}

/* build(device, n_roles, steps, graphed=False): steps is a sequence of
 * (function, grid_x, grid_y, grid_z, block, shared, pdl, cooperative, slots: bytes, patches)
 * with patches a sequence of (slot, role, offset). */
static PyObject *build(PyObject *self, PyObject *args) {
  int device, graphed = 0;
  unsigned n_roles;
  PyObject *steps_obj;
  if (!PyArg_ParseTuple(args, "iIO|p", &device, &n_roles, &steps_obj, &graphed)) return NULL;
  if (n_roles > MAX_VALUES) {
    PyErr_Format(PyExc_ValueError, "batch_launch: at most %d roles, got %u", MAX_VALUES, n_roles);
    return NULL;
  }
  PyObject *steps = PySequence_Fast(steps_obj, "steps: expected a sequence");
  if (!steps) return NULL;
  Py_ssize_t n_steps = PySequence_Fast_GET_SIZE(steps);
  Batch *batch = PyMem_Calloc(1, sizeof(Batch));
  if (batch) batch->steps = PyMem_Calloc(n_steps ? n_steps : 1, sizeof(Step));
  if (!batch || !batch->steps) {
    PyMem_Free(batch);
    Py_DECREF(steps);
    return PyErr_NoMemory();
  }
  batch->device = device;
  batch->n_roles = n_roles;
  batch->graph_state = GRAPH_OFF;
  for (Py_ssize_t i = 0; i < n_steps; i++, batch->n_steps++) {
    Step *step = &batch->steps[i];
    unsigned long long function;
    const char *slots;
    Py_ssize_t slots_len;
    PyObject *patches_obj;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(steps, i), "KIIIIIppy#O", &function, &step->grid[0],
                          &step->grid[1], &step->grid[2], &step->block, &step->shared, &step->pdl,
                          &step->cooperative, &slots, &slots_len, &patches_obj))
      goto fail;
    step->function = (CUfunction)(uintptr_t)function;
    if (slots_len % 8 || slots_len / 8 > MAX_PARAMS) {
      PyErr_Format(PyExc_ValueError, "batch_launch: step %zd: slots must be 8 bytes each, at most %d", i,
                   MAX_PARAMS);
      goto fail;
    }
    step->n_slots = (uint32_t)(slots_len / 8);
    step->slots = PyMem_Malloc(slots_len ? slots_len : 8);
    if (!step->slots) { PyErr_NoMemory(); goto fail; }
    memcpy(step->slots, slots, slots_len);
    PyObject *patches = PySequence_Fast(patches_obj, "patches: expected a sequence");
    if (!patches) goto fail;
    Py_ssize_t n_patches = PySequence_Fast_GET_SIZE(patches);
    step->patches = PyMem_Calloc(n_patches ? n_patches : 1, sizeof(Patch));
    if (!step->patches) { Py_DECREF(patches); PyErr_NoMemory(); goto fail; }
    for (Py_ssize_t j = 0; j < n_patches; j++) {
      Patch *patch = &step->patches[j];
      long long offset;
      if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(patches, j), "IIL", &patch->slot, &patch->role, &offset)) {
        Py_DECREF(patches);
        goto fail;
      }
      patch->offset = offset;
      if (patch->slot >= step->n_slots || patch->role >= n_roles) {
        PyErr_Format(PyExc_ValueError, "batch_launch: step %zd: patch %zd out of range", i, j);
        Py_DECREF(patches);
        goto fail;
      }
      step->n_patches++;
    }
    Py_DECREF(patches);
  }
  Py_DECREF(steps);
  for (uint32_t i = 0; graphed && i < batch->n_steps; i++)   /* launch attributes: no graph */
    graphed = !batch->steps[i].pdl && !batch->steps[i].cooperative;
  if (graphed) {
    if (pthread_mutex_init(&batch->lock, NULL)) {
      PyErr_SetString(PyExc_RuntimeError, "batch_launch: pthread_mutex_init failed");
      goto fail_freed;
    }
    batch->nodes = PyMem_Calloc(n_steps ? n_steps : 1, sizeof(CUgraphNode));
    if (!batch->nodes) {
      pthread_mutex_destroy(&batch->lock);
      PyErr_NoMemory();
      goto fail_freed;
    }
    batch->graph_state = GRAPH_UNBUILT;
  }
  PyObject *capsule = PyCapsule_New(batch, "tritonkv.batch", free_batch);
  if (!capsule) goto fail_freed;
  return capsule;
fail:
  Py_DECREF(steps);
fail_freed:
  destroy(batch, n_steps);
  return NULL;
}

/* The values of roles, as 64-bit words (pointers, the seed; two's complement for negatives). */
static Batch *unpack(PyObject *capsule, PyObject *values_obj, uint64_t *values) {
  Batch *batch = (Batch *)PyCapsule_GetPointer(capsule, "tritonkv.batch");
  if (!batch) return NULL;
  if (!PyList_Check(values_obj) || (size_t)PyList_GET_SIZE(values_obj) < batch->n_roles) {
    PyErr_Format(PyExc_TypeError, "values: expected a list of at least %u ints", batch->n_roles);
    return NULL;
  }
  for (uint32_t r = 0; r < batch->n_roles; r++) {
    values[r] = PyLong_AsUnsignedLongLongMask(PyList_GET_ITEM(values_obj, r));
    if (values[r] == (uint64_t)-1 && PyErr_Occurred()) return NULL;
  }
  return batch;
}

static void fill(const Step *step, const uint64_t *values, uint64_t *slots, void **params) {
  memcpy(slots, step->slots, step->n_slots * 8);
  for (uint32_t j = 0; j < step->n_patches; j++) {
    const Patch *patch = &step->patches[j];
    slots[patch->slot] = values[patch->role] + (uint64_t)patch->offset;
  }
  for (uint32_t s = 0; s < step->n_slots; s++) params[s] = &slots[s];
}

static int grid_empty(const Step *step) { return !(step->grid[0] && step->grid[1] && step->grid[2]); }

/* A step's grid, block and shared memory into a launch config or a kernel node's parameters
 * (two driver structs with these fields in common). */
#define SET_SHAPE(s, step)                                                  \
  do {                                                                      \
    (s).gridDimX = (step)->grid[0];                                         \
    (s).gridDimY = (step)->grid[1];                                         \
    (s).gridDimZ = (step)->grid[2];                                         \
    (s).blockDimX = (step)->block;                                          \
    (s).blockDimY = 1;                                                      \
    (s).blockDimZ = 1;                                                      \
    (s).sharedMemBytes = (step)->shared;                                    \
  } while (0)

static CUDA_KERNEL_NODE_PARAMS_v2 node_params(const Step *step, void **params) {
  CUDA_KERNEL_NODE_PARAMS_v2 p = {0};
  p.func = step->function;
  SET_SHAPE(p, step);
  p.kernelParams = params;
  return p;
}

/* Every step as plain launches, in order; *failed: the step that failed. */
static CUresult launch_steps(const Batch *batch, CUstream stream, const uint64_t *values, uint32_t *failed) {
  uint64_t slots[MAX_PARAMS];
  void *params[MAX_PARAMS];
  CUresult status = CUDA_SUCCESS;
  for (uint32_t i = 0; status == CUDA_SUCCESS && i < batch->n_steps; i++) {
    const Step *step = &batch->steps[i];
    fill(step, values, slots, params);
    CUlaunchAttribute attrs[2];
    unsigned n_attrs = 0;
    if (step->pdl) {
      attrs[n_attrs].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
      attrs[n_attrs++].value.programmaticStreamSerializationAllowed = 1;
    }
    if (step->cooperative) {
      attrs[n_attrs].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
      attrs[n_attrs++].value.cooperative = 1;
    }
    CUlaunchConfig config = {0};
    SET_SHAPE(config, step);
    config.hStream = stream;
    config.attrs = attrs;
    config.numAttrs = n_attrs;
    if (!grid_empty(step)) status = launch_ex(&config, step->function, params, NULL);
    *failed = i;
  }
  return status;
}

/* The chain of kernel nodes, with these values, instantiated (the batch's lock held). */
static CUresult build_graph(Batch *batch, const uint64_t *values) {
  uint64_t slots[MAX_PARAMS];
  void *params[MAX_PARAMS];
  CUresult status = graph_create(&batch->graph, 0);
  CUgraphNode last = NULL;
  for (uint32_t i = 0; status == CUDA_SUCCESS && i < batch->n_steps; i++) {
    const Step *step = &batch->steps[i];
    if (grid_empty(step)) continue;
    fill(step, values, slots, params);
    CUDA_KERNEL_NODE_PARAMS_v2 p = node_params(step, params);
    status = add_kernel_node(&batch->nodes[i], batch->graph, last ? &last : NULL, last ? 1 : 0, &p);
    last = batch->nodes[i];
    batch->graph_step = (int)i;
  }
  if (status == CUDA_SUCCESS) {
    batch->graph_step = (int)batch->n_steps;
    status = instantiate(&batch->exec, batch->graph, 0);
  }
  return status;
}

/* Re-points the nodes whose patched values changed since the last launch (the batch's lock held):
 * an updated node is uploaded again before the graph runs, which delays its start (H100: wall
 * time 1.1-1.5x of plain launches when every node was updated on every call), so calls whose
 * tensors come back at the same addresses (the caching allocator's usual case) update none. */
static CUresult update_graph(Batch *batch, const uint64_t *values) {
  uint64_t slots[MAX_PARAMS];
  void *params[MAX_PARAMS];
  CUresult status = CUDA_SUCCESS;
  for (uint32_t i = 0; status == CUDA_SUCCESS && i < batch->n_steps; i++) {
    const Step *step = &batch->steps[i];
    if (!batch->nodes[i]) continue;
    int changed = 0;
    for (uint32_t j = 0; j < step->n_patches && !changed; j++)
      changed = values[step->patches[j].role] != batch->last[step->patches[j].role];
    if (!changed) continue;
    fill(step, values, slots, params);
    CUDA_KERNEL_NODE_PARAMS_v2 p = node_params(step, params);
    status = set_params(batch->exec, batch->nodes[i], &p);
    batch->graph_step = (int)i;
  }
  return status;
}

/* The steps as one graph launch; returns 0 where the caller must launch them plainly (no
 * graphs, a capturing stream, or building / updating the graph failed: then never again). */
static int launch_graph(Batch *batch, CUstream stream, const uint64_t *values, CUresult *status) {
  CUstreamCaptureStatus capture;
  if (!have_graphs || is_capturing(stream, &capture) != CUDA_SUCCESS || capture != CU_STREAM_CAPTURE_STATUS_NONE)
    return 0;
  pthread_mutex_lock(&batch->lock);
  int done = 0;
  if (batch->graph_state != GRAPH_OFF) {
    CUresult ready = batch->graph_state == GRAPH_READY ? update_graph(batch, values) : build_graph(batch, values);
    if (ready == CUDA_SUCCESS) {
      memcpy(batch->last, values, batch->n_roles * sizeof(uint64_t));
      batch->graph_state = GRAPH_READY;
      *status = graph_launch(batch->exec, stream);
      done = 1;
    } else {
      batch->graph_error = ready;
      drop_graph(batch);
    }
  }
  pthread_mutex_unlock(&batch->lock);
  return done;
}

/* launch(batch, stream, values): every step, in order, on the stream. */
static PyObject *launch(PyObject *self, PyObject *args) {
  PyObject *capsule, *values_obj;
  unsigned long long stream;
  uint64_t values[MAX_VALUES];
  if (!PyArg_ParseTuple(args, "OKO", &capsule, &stream, &values_obj)) return NULL;
  Batch *batch = unpack(capsule, values_obj, values);
  if (!batch || !load_driver()) return NULL;
  CUresult status = CUDA_SUCCESS;
  uint32_t failed = 0;
  int graphed = 0;
  Py_BEGIN_ALLOW_THREADS;
  CUcontext context = NULL;
  status = ctx_get(&context);
  if (status == CUDA_SUCCESS && !context) {   /* a thread that has not used CUDA yet */
    CUdevice device;
    status = device_get(&device, batch->device);
    if (status == CUDA_SUCCESS) status = primary_retain(&context, device);
    if (status == CUDA_SUCCESS) status = ctx_set(context);
  }
  CUstream cu_stream = (CUstream)(uintptr_t)stream;
  if (status == CUDA_SUCCESS && batch->graph_state != GRAPH_OFF)
    graphed = launch_graph(batch, cu_stream, values, &status);
  if (status == CUDA_SUCCESS && !graphed) status = launch_steps(batch, cu_stream, values, &failed);
  Py_END_ALLOW_THREADS;
  if (status != CUDA_SUCCESS) {
    const char *text = NULL;
    error_string(status, &text);
    if (graphed)
      PyErr_Format(PyExc_RuntimeError, "batch_launch: graph launch: CUDA error %d (%s)", (int)status,
                   text ? text : "unknown");
    else
      PyErr_Format(PyExc_RuntimeError, "batch_launch: step %u: CUDA error %d (%s)", failed, (int)status,
                   text ? text : "unknown");
    return NULL;
  }
  Py_RETURN_NONE;
}

/* The batch that is a function's one argument (NULL with the exception set). */
static Batch *batch_arg(PyObject *args) {
  PyObject *capsule;
  if (!PyArg_ParseTuple(args, "O", &capsule)) return NULL;
  return (Batch *)PyCapsule_GetPointer(capsule, "tritonkv.batch");
}

/* graph_state(batch): -1 plain launches, 0 a graph not built yet, 1 launching as a graph. */
static PyObject *graph_state(PyObject *self, PyObject *args) {
  Batch *batch = batch_arg(args);
  return batch ? PyLong_FromLong(batch->graph_state) : NULL;
}

/* patched(batch, values): each step's parameter slots as launch() would pass them (bytes), for tests. */
static PyObject *patched(PyObject *self, PyObject *args) {
  PyObject *capsule, *values_obj;
  uint64_t values[MAX_VALUES];
  if (!PyArg_ParseTuple(args, "OO", &capsule, &values_obj)) return NULL;
  Batch *batch = unpack(capsule, values_obj, values);
  if (!batch) return NULL;
  PyObject *out = PyList_New(batch->n_steps);
  if (!out) return NULL;
  uint64_t slots[MAX_PARAMS];
  void *params[MAX_PARAMS];
  for (uint32_t i = 0; i < batch->n_steps; i++) {
    fill(&batch->steps[i], values, slots, params);
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)slots, batch->steps[i].n_slots * 8);
    if (!bytes) { Py_DECREF(out); return NULL; }
    PyList_SET_ITEM(out, i, bytes);
  }
  return out;
}

/* graph_error(batch): (CUresult, step) that dropped the batch's graph: (0, _) none; step n_steps:
 * instantiating it. */
static PyObject *graph_error(PyObject *self, PyObject *args) {
  Batch *batch = batch_arg(args);
  return batch ? Py_BuildValue("(ii)", (int)batch->graph_error, batch->graph_step) : NULL;
}

/* graphs_found(): whether libcuda has every graph function a graphed batch calls (loads it). */
static PyObject *graphs_found(PyObject *self, PyObject *args) {
  if (!load_driver()) return NULL;
  return PyBool_FromLong(have_graphs);
}

static PyMethodDef methods[] = {
    {"build", build, METH_VARARGS, "Pack recorded launches into a batch."},
    {"launch", launch, METH_VARARGS, "Launch a batch's steps on a stream."},
    {"patched", patched, METH_VARARGS, "A batch's parameter slots with values patched in."},
    {"graph_state", graph_state, METH_VARARGS, "-1: plain launches, 0: graph not built yet, 1: graph."},
    {"graph_error", graph_error, METH_VARARGS, "(CUresult, step) that dropped a batch's graph (0: none)."},
    {"graphs_found", graphs_found, METH_NOARGS, "Whether libcuda has the graph functions (loads it)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "tritonkv_batch_launch", NULL, -1, methods};

PyMODINIT_FUNC PyInit_tritonkv_batch_launch(void) { return PyModule_Create(&module); }
