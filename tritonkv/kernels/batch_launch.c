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
 * libcuda is opened with dlopen on the first launch, so the module builds and its packing
 * can be checked (patched()) on a machine without CUDA.
 */
#include "cuda.h"
#include <dlfcn.h>
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

typedef struct {
  int device;
  uint32_t n_steps, n_roles;
  Step *steps;
} Batch;

typedef CUresult (*launch_ex_t)(const CUlaunchConfig *, CUfunction, void **, void **);
typedef CUresult (*error_string_t)(CUresult, const char **);
typedef CUresult (*ctx_get_t)(CUcontext *);
typedef CUresult (*ctx_set_t)(CUcontext);
typedef CUresult (*device_get_t)(CUdevice *, int);
typedef CUresult (*retain_t)(CUcontext *, CUdevice);

static launch_ex_t launch_ex;
static error_string_t error_string;
static ctx_get_t ctx_get;
static ctx_set_t ctx_set;
static device_get_t device_get;
static retain_t primary_retain;

static int load_driver(void) {
  if (launch_ex) return 1;
  void *lib = dlopen("libcuda.so.1", RTLD_LAZY);
  if (!lib) {
    PyErr_SetString(PyExc_RuntimeError, "batch_launch: cannot open libcuda.so.1");
    return 0;
  }
  error_string = (error_string_t)dlsym(lib, "cuGetErrorString");
  ctx_get = (ctx_get_t)dlsym(lib, "cuCtxGetCurrent");
  ctx_set = (ctx_set_t)dlsym(lib, "cuCtxSetCurrent");
  device_get = (device_get_t)dlsym(lib, "cuDeviceGet");
  primary_retain = (retain_t)dlsym(lib, "cuDevicePrimaryCtxRetain");
  launch_ex_t found = (launch_ex_t)dlsym(lib, "cuLaunchKernelEx");
  if (!(error_string && ctx_get && ctx_set && device_get && primary_retain && found)) {
    PyErr_SetString(PyExc_RuntimeError, "batch_launch: libcuda.so.1 lacks a driver function it needs");
    return 0;
  }
  launch_ex = found;   /* last: another thread reads it as "all loaded" */
  return 1;
}

/* Frees a batch and the buffers of its first ``steps`` steps (zeroed when allocated: a step
 * left half-built by a failed build() frees what it holds). */
static void destroy(Batch *batch, Py_ssize_t steps) {
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

/* build(device, n_roles, steps): steps is a sequence of
 * (function, grid_x, grid_y, grid_z, block, shared, pdl, cooperative, slots: bytes, patches)
 * with patches a sequence of (slot, role, offset). */
static PyObject *build(PyObject *self, PyObject *args) {
  int device;
  unsigned n_roles;
  PyObject *steps_obj;
  if (!PyArg_ParseTuple(args, "iIO", &device, &n_roles, &steps_obj)) return NULL;
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
  Py_BEGIN_ALLOW_THREADS;
  CUcontext context = NULL;
  status = ctx_get(&context);
  if (status == CUDA_SUCCESS && !context) {   /* a thread that has not used CUDA yet */
    CUdevice device;
    status = device_get(&device, batch->device);
    if (status == CUDA_SUCCESS) status = primary_retain(&context, device);
    if (status == CUDA_SUCCESS) status = ctx_set(context);
  }
  uint64_t slots[MAX_PARAMS];
  void *params[MAX_PARAMS];
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
    config.gridDimX = step->grid[0];
    config.gridDimY = step->grid[1];
    config.gridDimZ = step->grid[2];
    config.blockDimX = step->block;
    config.blockDimY = 1;
    config.blockDimZ = 1;
    config.sharedMemBytes = step->shared;
    config.hStream = (CUstream)(uintptr_t)stream;
    config.attrs = attrs;
    config.numAttrs = n_attrs;
    if (step->grid[0] && step->grid[1] && step->grid[2]) status = launch_ex(&config, step->function, params, NULL);
    failed = i;
  }
  Py_END_ALLOW_THREADS;
  if (status != CUDA_SUCCESS) {
    const char *text = NULL;
    error_string(status, &text);
    PyErr_Format(PyExc_RuntimeError, "batch_launch: step %u: CUDA error %d (%s)", failed, (int)status,
                 text ? text : "unknown");
    return NULL;
  }
  Py_RETURN_NONE;
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

static PyMethodDef methods[] = {
    {"build", build, METH_VARARGS, "Pack recorded launches into a batch."},
    {"launch", launch, METH_VARARGS, "Launch a batch's steps on a stream."},
    {"patched", patched, METH_VARARGS, "A batch's parameter slots with values patched in."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "tritonkv_batch_launch", NULL, -1, methods};

PyMODINIT_FUNC PyInit_tritonkv_batch_launch(void) { return PyModule_Create(&module); }
