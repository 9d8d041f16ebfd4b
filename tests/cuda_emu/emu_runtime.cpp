/* emu_runtime.cpp - the CPU side of the CUDA emulator: runs the real kernels/ code (rewritten by
 * cudapp.py) one block at a time, every CUDA thread a fiber, so that __syncthreads and warp
 * shuffles are real barriers; plus our own definitions of every cuda* / cublas* call kernels/
 * makes (no libcudart, no libcublas). A test tool for kernel logic, not a GPU: no timing, no true
 * concurrency between warps, no GPU memory model; the real GPU runs stay the final word.
 *
 * What it checks beyond the arithmetic (each a launch failure naming the kernel and block):
 *  - deadlock: a barrier some live thread can never reach (threads that returned take no part);
 *  - a warp shuffle whose mask names lanes that returned or wait elsewhere, or lanes of one warp
 *    at different warp operations; threads of one block at different __syncthreads;
 *  - __shared__ memory is poisoned (NaN bytes) for every block, warps run in a seeded random order
 *    between barriers (EMU_SEED) so a missing __syncthreads has a chance to show;
 *  - cudaMalloc memory starts poisoned, kernel pointer arguments must point into live device (or
 *    pinned) memory, copies must stay inside their allocations, __ldg must be aligned;
 *  - streams really are asynchronous: work runs only when something waits for it (a sync, an
 *    event, a download), pinned host memory is read when the copy runs, so a missing wait or a
 *    staging buffer reused too early gives wrong results here as on the GPU.
 * Environment: EMU_SEED (warp order; 0 = in order; default from the clock, printed),
 * EMU_THREADS (CPU threads running blocks; default: all cores), EMU_POISON=0 (no poisoning). */
#include "emu.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

/* ---- opaque handle types of emu.h ---- */
struct emu_op {
    std::function<void()> fn; /* may run more than once (graph replays) */
    bool kernel = false;      /* a kernel launch (or a cuBLAS call): a kernel node when captured */
};
typedef std::shared_ptr<emu_op> emu_op_p;

struct emu_graph_t {
    std::vector<emu_op_p> ops;
};

struct emu_stream {
    std::deque<emu_op_p> q;
    uint64_t enq = 0, done = 0; /* ops queued / finished so far */
    unsigned flags = 0;
    emu_graph_t *cap = nullptr; /* capturing into this graph */
    bool cap_bad = false;       /* the capture was invalidated */
};

struct emu_event {
    emu_stream *s = nullptr; /* recorded on (nullptr: never, or complete by construction) */
    uint64_t seq = 0;
};

struct emu_blas {
    cudaStream_t stream = nullptr;
    cublasMath_t math = CUBLAS_DEFAULT_MATH;
};

namespace emu {

thread_local uint3 tl_threadIdx, tl_blockIdx;
thread_local dim3 tl_blockDim, tl_gridDim;
thread_local int tl_lane;

/* ================= global state (touched by the host thread that calls the API) ============= */

static std::mutex g_mu; /* the allocation map (read by worker threads checking arguments) */
struct alloc_info {
    size_t n;
    bool device; /* else pinned host memory (cudaHostAlloc) */
};
static std::map<uintptr_t, alloc_info> g_mem;
static cudaError_t g_last = cudaSuccess;   /* cleared by cudaGetLastError */
static cudaError_t g_sticky = cudaSuccess; /* a failed kernel: the context is dead, as on a GPU */
static std::string g_detail;               /* what cudaGetErrorString adds for g_detail_code */
static cudaError_t g_detail_code = cudaSuccess;
static emu_stream g_null_stream;
static std::vector<emu_stream *> g_streams; /* every live stream, for implicit synchronisation */
static int g_capturing;                      /* streams capturing right now */
static uint64_t g_seed;
static int g_threads = 1;
static bool g_poison = true;
static uint64_t g_launches;
static std::map<const void *, int> g_max_dyn_smem; /* cudaFuncSetAttribute */

static void init_once(void);

static void set_detail(cudaError_t e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_detail(cudaError_t e, const char *fmt, ...)
{
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    g_detail = buf;
    g_detail_code = e;
    fprintf(stderr, "[cuda emulator] %s\n", buf);
    fflush(stderr);
}

/* an API error: reported by the call and by the next cudaGetLastError */
static cudaError_t api_err(cudaError_t e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static cudaError_t api_err(cudaError_t e, const char *fmt, ...)
{
    char buf[1536];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    set_detail(e, "%s", buf);
    g_last = e;
    return e;
}

static void sticky(cudaError_t e, const std::string &msg)
{
    if (g_sticky)
        return;
    g_sticky = e;
    set_detail(e, "%s (the CUDA context is now unusable, as on a GPU)", msg.c_str());
}

static cudaError_t ok_or_sticky(void) { return g_sticky ? g_sticky : cudaSuccess; }

/* ---- allocations ---- */

/* the allocation holding [p, p + n) (n may be 0: p may be its end), or nullptr */
static const alloc_info *find_alloc(const void *p, size_t n, uintptr_t *base)
{
    const uintptr_t a = (uintptr_t)p;
    auto it = g_mem.upper_bound(a);
    if (it == g_mem.begin())
        return nullptr;
    --it;
    if (a < it->first || a - it->first > it->second.n || n > it->second.n - (a - it->first))
        return nullptr;
    if (base)
        *base = it->first;
    return &it->second;
}

/* 0: host (pageable), 1: device, 2: pinned host, -1: starts inside an allocation, runs past it */
static int mem_kind(const void *p, size_t n)
{
    std::lock_guard<std::mutex> lk(g_mu);
    const alloc_info *ai = find_alloc(p, n, nullptr);
    if (ai)
        return ai->device ? 1 : 2;
    if (find_alloc(p, 0, nullptr))
        return -1;
    return 0;
}

/* ================= streams: work runs when someone waits for it ================= */

static void drain(emu_stream *s, uint64_t upto)
{
    while (s->done < upto && !s->q.empty()) {
        emu_op_p op = s->q.front();
        s->q.pop_front();
        s->done++;
        if (!g_sticky)
            op->fn();
    }
}

static void drain_all(void)
{
    drain(&g_null_stream, g_null_stream.enq);
    for (size_t i = 0; i < g_streams.size(); i++)
        drain(g_streams[i], g_streams[i]->enq);
}

static emu_stream *stream_of(cudaStream_t s) { return s ? (emu_stream *)s : &g_null_stream; }

static void enqueue(cudaStream_t cs, std::function<void()> fn, bool kernel = false)
{
    emu_stream *s = stream_of(cs);
    emu_op_p op = std::make_shared<emu_op>();
    op->fn = std::move(fn);
    op->kernel = kernel;
    if (s->cap) {
        s->cap->ops.push_back(op);
        return;
    }
    s->q.push_back(op);
    s->enq++;
}

/* An API that stream capture forbids (it would synchronise or change memory under a graph). */
static cudaError_t capture_forbids(const char *what)
{
    if (!g_capturing)
        return cudaSuccess;
    for (emu_stream *s : g_streams)
        if (s->cap)
            s->cap_bad = true;
    return api_err((cudaError_t)900, "%s is not allowed while a stream is being captured (the capture is now invalid)",
                   what);
}

/* ================= fibers ================= */

#if defined(__x86_64__)
extern "C" void emu_swap(void **save_sp, void *to_sp);
__asm__(".text\n"
        ".globl emu_swap\n"
        ".type emu_swap,@function\n"
        "emu_swap:\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
        "  ret\n"
        ".size emu_swap, .-emu_swap\n");
#endif

enum { F_RUN, F_WARP, F_BLOCK, F_DONE, F_FAULT };
enum { K_SHFL, K_SYNCWARP };

struct fiber {
#if defined(__x86_64__)
    void *sp;
#else
    ucontext_t uc;
#endif
    char *stack;
    uint3 tid;
    int lin, lane, warp;
    int state, kind;
    const char *file;
    int line;
    unsigned mask;
    unsigned gen; /* warp operations passed: picks the exchange buffer */
};

static const size_t STACK = 256 * 1024;
static const size_t SMEM_STATIC = 48 * 1024;
static const size_t SMEM_OPTIN = 227 * 1024; /* H100's opt-in limit per block */

struct worker {
    std::vector<fiber> f;
    char *stacks = nullptr;
    int n_stacks = 0;
#if defined(__x86_64__)
    void *sched_sp = nullptr;
#else
    ucontext_t sched;
#endif
    const launch_desc *d = nullptr;
    alignas(64) unsigned char smem[SMEM_OPTIN];
    size_t smem_used = 0, dyn = 0;
    struct svar {
        const char *key;
        size_t off;
    };
    std::vector<svar> svars;
    uint64_t xchg[32][2][32];
    std::string err;
    char altstack[64 * 1024];
};

static thread_local worker *tl_w;
static thread_local fiber *tl_f;

static worker *get_worker(void)
{
    if (!tl_w) {
        tl_w = new worker();
        /* a fiber that overflows its stack faults on the guard page: report it from here */
        stack_t ss;
        memset(&ss, 0, sizeof ss);
        ss.ss_sp = tl_w->altstack;
        ss.ss_size = sizeof tl_w->altstack;
        sigaltstack(&ss, nullptr);
    }
    return tl_w;
}

static void ensure_stacks(worker *w, int n)
{
    if (n <= w->n_stacks)
        return;
    if (w->stacks)
        munmap(w->stacks, (size_t)w->n_stacks * STACK);
    w->stacks = (char *)mmap(nullptr, (size_t)n * STACK, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (w->stacks == MAP_FAILED) {
        fprintf(stderr, "[cuda emulator] cannot map %d fiber stacks\n", n);
        abort();
    }
    for (int i = 0; i < n; i++) /* guard page at the low end of each stack */
        mprotect(w->stacks + (size_t)i * STACK, 4096, PROT_NONE);
    w->n_stacks = n;
}

static void fiber_yield(fiber *f)
{
    worker *w = tl_w;
#if defined(__x86_64__)
    emu_swap(&f->sp, w->sched_sp);
#else
    swapcontext(&f->uc, &w->sched);
#endif
}

static void fiber_main(void)
{
    worker *w = tl_w;
    w->d->run(w->d->ctx);
    fiber *f = tl_f;
    f->state = F_DONE;
    fiber_yield(f);
    __builtin_trap(); /* a finished fiber is never resumed */
}

static void fiber_start(worker *w, fiber *f)
{
#if defined(__x86_64__)
    /* the floating-point control words are not switched: kernels never change them */
    uintptr_t top = ((uintptr_t)f->stack + STACK) & ~(uintptr_t)15;
    uint64_t *sp = (uint64_t *)(top - 64);
    memset(sp, 0, 48);                        /* r15 .. rbp */
    sp[6] = (uint64_t)(uintptr_t)&fiber_main; /* emu_swap's ret lands here */
    sp[7] = 0;                                /* fiber_main's (never used) return address */
    f->sp = sp;
#else
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack + 4096;
    f->uc.uc_stack.ss_size = STACK - 4096;
    f->uc.uc_link = nullptr;
    makecontext(&f->uc, &fiber_main, 0);
#endif
    (void)w;
}

static void fiber_resume(worker *w, fiber *f)
{
    tl_f = f;
    tl_threadIdx = f->tid;
    tl_lane = f->lane;
#if defined(__x86_64__)
    emu_swap(&w->sched_sp, f->sp);
#else
    swapcontext(&w->sched, &f->uc);
#endif
}

/* ---- device-side calls (from inside a fiber) ---- */

void device_fault(const char *file, int line, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    worker *w = tl_w;
    fiber *f = tl_f;
    char where[1400];
    snprintf(where, sizeof where, "thread (%u,%u,%u) at %s:%d: %s", f->tid.x, f->tid.y, f->tid.z, file, line, buf);
    w->err = where;
    f->state = F_FAULT;
    fiber_yield(f);
    __builtin_trap();
}

void syncthreads(const char *file, int line)
{
    fiber *f = tl_f;
    f->state = F_BLOCK;
    f->file = file;
    f->line = line;
    fiber_yield(f);
}

static void warp_wait(fiber *f, int kind, unsigned mask, const char *file, int line)
{
    f->state = F_WARP;
    f->kind = kind;
    f->mask = mask;
    f->file = file;
    f->line = line;
    fiber_yield(f);
    f->gen++;
}

void syncwarp(const char *file, int line, unsigned mask)
{
    warp_wait(tl_f, K_SYNCWARP, mask, file, line);
}

uint64_t warp_exchange(uint64_t v, int src, unsigned mask, const char *file, int line)
{
    worker *w = tl_w;
    fiber *f = tl_f;
    const int buf = f->gen & 1;
    w->xchg[f->warp][buf][f->lane] = v;
    warp_wait(f, K_SHFL, mask, file, line);
    if (src < 0 || src > 31 || !(mask >> src & 1u))
        device_fault(file, line, "shuffle reads lane %d, which is not in the mask 0x%08x", src, mask);
    return w->xchg[f->warp][buf][src];
}

void *shared_var(const char *key, size_t bytes, size_t align)
{
    worker *w = tl_w;
    for (const worker::svar &v : w->svars)
        if (v.key == key)
            return w->smem + v.off;
    for (const worker::svar &v : w->svars) /* the same key from another translation unit */
        if (!strcmp(v.key, key))
            return w->smem + v.off;
    size_t off = (w->smem_used + align - 1) / align * align;
    if (off + bytes > SMEM_STATIC)
        device_fault(key, 0, "static __shared__ memory of the block exceeds 48 KiB (%zu bytes)", off + bytes);
    if (g_poison)
        memset(w->smem + off, 0xff, bytes);
    w->svars.push_back(worker::svar{key, off});
    w->smem_used = off + bytes;
    return w->smem + off;
}

void *dyn_shared(void)
{
    worker *w = tl_w;
    return w->smem + SMEM_OPTIN - w->dyn; /* at the top; static variables grow from the bottom */
}

/* ================= running a launch ================= */

static std::string site(const fiber &f) { return std::string(f.file ? f.file : "?") + ":" + std::to_string(f.line); }

/* Lanes of warp `wi` that can: run them until each blocks; release warp operations that every
 * live lane reached. Returns false on a fault (w->err says why). */
static bool run_warp(worker *w, int wi, int n, const int *lane_order)
{
    const int l0 = wi * 32, nl = n - l0 < 32 ? n - l0 : 32;
    for (;;) {
        for (int k = 0; k < 32; k++) {
            const int l = lane_order[k];
            if (l >= nl)
                continue;
            fiber *f = &w->f[l0 + l];
            if (f->state == F_RUN)
                fiber_resume(w, f);
            if (f->state == F_FAULT)
                return false;
        }
        unsigned live = 0, waiting = 0;
        const fiber *first = nullptr;
        for (int l = 0; l < nl; l++) {
            const fiber *f = &w->f[l0 + l];
            if (f->state != F_DONE)
                live |= 1u << l;
            if (f->state == F_WARP) {
                waiting |= 1u << l;
                if (!first)
                    first = f;
            }
        }
        if (!waiting || waiting != live)
            return true; /* the block-level loop decides (barrier, done or deadlock) */
        const unsigned exist = nl == 32 ? 0xffffffffu : (1u << nl) - 1;
        for (int l = 0; l < nl; l++) {
            const fiber *f = &w->f[l0 + l];
            if (f->kind != first->kind || f->mask != first->mask || f->line != first->line ||
                strcmp(f->file, first->file)) {
                w->err = "lanes of warp " + std::to_string(wi) + " are at different warp operations: lane " +
                         std::to_string(first->lane) + " at " + site(*first) + " (mask " +
                         std::to_string(first->mask) + "), lane " + std::to_string(l) + " at " + site(*f) +
                         " (mask " + std::to_string(f->mask) + ")";
                return false;
            }
        }
        if ((first->mask & exist) != live) {
            char b[512];
            snprintf(b, sizeof b,
                     "warp %d: %s at %s with mask 0x%08x, but the live lanes are 0x%08x (a lane that returned, "
                     "or never gets here, cannot take part)",
                     wi, first->kind == K_SHFL ? "shuffle" : "__syncwarp", site(*first).c_str(), first->mask, live);
            w->err = b;
            return false;
        }
        for (int l = 0; l < nl; l++)
            w->f[l0 + l].state = F_RUN;
    }
}

static uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void shuffle_ints(int *a, int n, uint64_t *rng)
{
    for (int i = n - 1; i > 0; i--) {
        *rng = mix64(*rng);
        int j = (int)(*rng % (uint64_t)(i + 1)), t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

/* One block of d on this CPU thread. Returns false with w->err set on a fault. */
static bool run_block(worker *w, const launch_desc &d, uint64_t launch_no, unsigned bx, unsigned by, unsigned bz)
{
    const int n = (int)(d.block.x * d.block.y * d.block.z), nw = (n + 31) / 32;
    ensure_stacks(w, n);
    if ((int)w->f.size() < n)
        w->f.resize(n);
    w->d = &d;
    w->svars.clear();
    w->smem_used = 0;
    w->dyn = d.smem;
    if (g_poison && d.smem)
        memset(w->smem + SMEM_OPTIN - d.smem, 0xff, d.smem);
    tl_blockIdx = uint3{bx, by, bz};
    tl_blockDim = d.block;
    tl_gridDim = d.grid;
    for (int i = 0; i < n; i++) {
        fiber *f = &w->f[i];
        f->stack = w->stacks + (size_t)i * STACK;
        f->lin = i;
        f->tid = uint3{(unsigned)i % d.block.x, (unsigned)i / d.block.x % d.block.y,
                       (unsigned)i / (d.block.x * d.block.y)};
        f->lane = i & 31;
        f->warp = i >> 5;
        f->state = F_RUN;
        f->gen = 0;
        f->file = nullptr;
        f->line = 0;
        fiber_start(w, f);
    }
    uint64_t rng = mix64(g_seed ^ mix64(launch_no) ^ ((uint64_t)bz << 42 ^ (uint64_t)by << 21 ^ bx));
    int order[32], lanes[32];
    for (int i = 0; i < 32; i++)
        order[i] = lanes[i] = i;
    if (g_seed)
        shuffle_ints(lanes, 32, &rng);
    for (;;) {
        if (g_seed)
            shuffle_ints(order, nw < 32 ? nw : 32, &rng);
        for (int k = 0; k < nw; k++)
            if (!run_warp(w, order[k], n, lanes))
                return false;
        int live = 0, at_block = 0;
        const fiber *first = nullptr;
        for (int i = 0; i < n; i++) {
            const fiber &f = w->f[i];
            if (f.state == F_DONE)
                continue;
            live++;
            if (f.state == F_BLOCK) {
                at_block++;
                if (!first)
                    first = &f;
            }
        }
        if (!live)
            return true;
        if (at_block != live) {
            /* someone waits at a warp operation its warp can never complete */
            std::string why = "deadlock: ";
            for (int i = 0, shown = 0; i < n && shown < 4; i++) {
                const fiber &f = w->f[i];
                if (f.state == F_WARP) {
                    why += "thread " + std::to_string(i) + " waits at a warp operation at " + site(f) + "; ";
                    shown++;
                }
            }
            if (first)
                why += "thread " + std::to_string(first->lin) + " waits at __syncthreads at " + site(*first) + "; ";
            why += std::to_string(live) + " threads live, " + std::to_string(at_block) + " at __syncthreads";
            w->err = why;
            return false;
        }
        for (int i = 0; i < n; i++) {
            fiber &f = w->f[i];
            if (f.state != F_BLOCK)
                continue;
            if (f.line != first->line || strcmp(f.file, first->file)) {
                w->err = "threads of one block at different __syncthreads: thread " + std::to_string(first->lin) +
                         " at " + site(*first) + ", thread " + std::to_string(i) + " at " + site(f);
                return false;
            }
            f.state = F_RUN;
        }
    }
}

/* ---- a pool of CPU threads running the blocks of one launch ---- */

struct pool {
    std::mutex mu;
    std::condition_variable cv, done_cv;
    std::vector<std::thread> th;
    uint64_t job_gen = 0;
    std::function<void(void)> job; /* run by every thread, the caller included */
    int running = 0;
};
static pool *g_pool;

static void pool_thread(void)
{
    uint64_t seen = 0;
    for (;;) {
        std::function<void(void)> job;
        {
            std::unique_lock<std::mutex> lk(g_pool->mu);
            g_pool->cv.wait(lk, [&] { return g_pool->job_gen != seen; });
            seen = g_pool->job_gen;
            job = g_pool->job;
        }
        job();
        std::lock_guard<std::mutex> lk(g_pool->mu);
        if (--g_pool->running == 0)
            g_pool->done_cv.notify_all();
    }
}

/* fn(i) for i in [0, n) on every pool thread (and the caller); returns when all are done */
static void parallel_for(int64_t n, const std::function<void(int64_t)> &fn)
{
    if (g_threads <= 1 || n < 2) {
        for (int64_t i = 0; i < n; i++)
            fn(i);
        return;
    }
    if (!g_pool) {
        g_pool = new pool();
        for (int i = 1; i < g_threads; i++)
            g_pool->th.emplace_back(pool_thread);
        for (std::thread &t : g_pool->th)
            t.detach();
    }
    std::atomic<int64_t> next(0);
    auto body = [&] {
        for (int64_t i; (i = next.fetch_add(1)) < n;)
            fn(i);
    };
    {
        std::lock_guard<std::mutex> lk(g_pool->mu);
        g_pool->job = body;
        g_pool->running = g_threads - 1;
        g_pool->job_gen++;
    }
    g_pool->cv.notify_all();
    body();
    std::unique_lock<std::mutex> lk(g_pool->mu);
    g_pool->done_cv.wait(lk, [&] { return g_pool->running == 0; });
}

static thread_local const launch_desc *tl_running; /* for the crash handler */

static void run_launch(const launch_desc &d, uint64_t launch_no)
{
    /* pointer arguments must point into live device (or pinned) memory when the kernel runs */
    {
        std::lock_guard<std::mutex> lk(g_mu);
        for (int i = 0; i < d.n_ptr; i++) {
            if (!d.ptr_args[i] || find_alloc(d.ptr_args[i], 0, nullptr))
                continue;
            char b[512];
            snprintf(b, sizeof b,
                     "kernel %s (launched at %s:%d): argument %d is %p, not in device memory (a host pointer, or "
                     "memory freed before the kernel ran)",
                     d.name, d.file, d.line, d.ptr_argi[i] + 1, d.ptr_args[i]);
            sticky(cudaErrorIllegalAddress, b);
            return;
        }
    }
    const unsigned gx = d.grid.x, gy = d.grid.y, gz = d.grid.z;
    const int64_t nb = (int64_t)gx * gy * gz;
    std::mutex err_mu;
    std::string err;
    std::atomic<bool> failed(false);
    auto one = [&](int64_t b) {
        if (failed.load(std::memory_order_relaxed))
            return;
        worker *w = get_worker();
        tl_running = &d;
        const unsigned bx = (unsigned)(b % gx), by = (unsigned)(b / gx % gy), bz = (unsigned)(b / ((int64_t)gx * gy));
        if (!run_block(w, d, launch_no, bx, by, bz)) {
            std::lock_guard<std::mutex> lk(err_mu);
            if (!failed.exchange(true)) {
                char hdr[512];
                snprintf(hdr, sizeof hdr, "kernel %s (launched at %s:%d, grid %ux%ux%u, block %ux%ux%u), block (%u,%u,%u): ",
                         d.name, d.file, d.line, gx, gy, gz, d.block.x, d.block.y, d.block.z, bx, by, bz);
                err = hdr + w->err;
            }
        }
        tl_running = nullptr;
    };
    /* few blocks: not worth waking the pool */
    if (nb * d.block.x * d.block.y * d.block.z < 4096)
        for (int64_t b = 0; b < nb; b++)
            one(b);
    else
        parallel_for(nb, one);
    if (failed)
        sticky(cudaErrorLaunchFailure, err);
}

struct launch_holder {
    launch_desc d;
    ~launch_holder() { d.ctx_free(d.ctx); }
};

void submit(const launch_desc &d0)
{
    init_once();
    std::shared_ptr<launch_holder> h = std::make_shared<launch_holder>();
    h->d = d0;
    const launch_desc &d = h->d;
    const uint64_t threads = (uint64_t)d.block.x * d.block.y * d.block.z;
    if (!threads || threads > 1024 || d.block.x > 1024 || d.block.y > 1024 || d.block.z > 64 || !d.grid.x ||
        !d.grid.y || !d.grid.z || d.grid.x > 2147483647u || d.grid.y > 65535 || d.grid.z > 65535) {
        api_err(cudaErrorInvalidConfiguration, "kernel %s launched at %s:%d with grid %ux%ux%u, block %ux%ux%u",
                d.name, d.file, d.line, d.grid.x, d.grid.y, d.grid.z, d.block.x, d.block.y, d.block.z);
        return;
    }
    size_t max_dyn = SMEM_STATIC;
    auto it = g_max_dyn_smem.find(d.fn);
    if (it != g_max_dyn_smem.end())
        max_dyn = (size_t)it->second;
    if (d.smem > SMEM_OPTIN || d.smem > max_dyn) {
        api_err(cudaErrorInvalidValue,
                "kernel %s launched at %s:%d with %zu bytes of dynamic shared memory (more than 48 KiB needs "
                "cudaFuncSetAttribute(MaxDynamicSharedMemorySize); at most 227 KiB)",
                d.name, d.file, d.line, d.smem);
        return;
    }
    const uint64_t no = ++g_launches;
    enqueue(d.stream, [h, no] { run_launch(h->d, no); }, true);
}

/* crash inside a kernel (an out-of-bounds access, a fiber stack overflow): say which kernel */
static void on_crash(int sig, siginfo_t *si, void *)
{
    char b[600];
    const launch_desc *d = tl_running;
    int n;
    if (d && tl_f)
        n = snprintf(b, sizeof b,
                     "\n[cuda emulator] signal %d (address %p) inside kernel %s (launched at %s:%d), block (%u,%u,%u) "
                     "thread (%u,%u,%u)\n",
                     sig, si->si_addr, d->name, d->file, d->line, tl_blockIdx.x, tl_blockIdx.y, tl_blockIdx.z,
                     tl_threadIdx.x, tl_threadIdx.y, tl_threadIdx.z);
    else
        n = snprintf(b, sizeof b, "\n[cuda emulator] signal %d (address %p) outside any kernel\n", sig, si->si_addr);
    if (n > 0 && write(2, b, (size_t)n < sizeof b ? (size_t)n : sizeof b - 1) < 0) {}
    signal(sig, SIG_DFL);
    raise(sig);
}

static void init_once(void)
{
    static bool done;
    if (done)
        return;
    done = true;
    const char *s = getenv("EMU_SEED");
    g_seed = s && *s ? strtoull(s, nullptr, 10) : ((uint64_t)time(nullptr) ^ (uint64_t)getpid() << 16) % 1000000007ull;
    const char *t = getenv("EMU_THREADS");
    unsigned hc = std::thread::hardware_concurrency();
    g_threads = t && *t ? atoi(t) : (int)(hc ? hc : 1);
    if (g_threads < 1)
        g_threads = 1;
    if (g_threads > 64)
        g_threads = 64;
    const char *p = getenv("EMU_POISON");
    g_poison = !(p && *p == '0');
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_crash;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
    get_worker();
    printf("[cuda emulator] CUDA kernels run on the CPU (tests/cuda_emu): logic only, not a GPU - the real GPU "
           "runs are the final word. %d CPU threads, warp order seed %llu (EMU_SEED=%llu replays it)\n",
           g_threads, (unsigned long long)g_seed, (unsigned long long)g_seed);
    fflush(stdout);
}

/* ================= cuBLAS GEMM ================= */

static float tf32_round(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) {
        u += 0xfffu + ((u >> 13) & 1u); /* nearest even at 10 mantissa bits */
        u &= ~0x1fffu;
    }
    memcpy(&f, &u, 4);
    return f;
}

static float dot(const float *a, const float *b, int k)
{
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int l = 0;
    for (; l + 8 <= k; l += 8)
        for (int u = 0; u < 8; u++)
            s[u] += a[l + u] * b[l + u];
    float t = 0.0f;
    for (; l < k; l++)
        t += a[l] * b[l];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + t;
}

struct gemm_args {
    cublasOperation_t ta, tb;
    int m, n, k, lda, ldb, ldc;
    float alpha, beta;
    const void *A, *B;
    void *C;
    cudaDataType at, bt, ct;
    int round; /* 0 none, 1 tf32, 2 fp16 */
};

/* element (i, l) of op(X) where X is column-major with leading dimension ld */
static float gemm_get(const void *X, cudaDataType t, cublasOperation_t op, int i, int l, int ld, int round)
{
    const size_t idx = op == CUBLAS_OP_N ? (size_t)i + (size_t)l * ld : (size_t)l + (size_t)i * ld;
    float v = t == CUDA_R_32F ? ((const float *)X)[idx] : __half2float(((const __half *)X)[idx]);
    if (t == CUDA_R_32F && round == 1)
        v = tf32_round(v);
    else if (t == CUDA_R_32F && round == 2)
        v = __half2float(__float2half_rn(v));
    return v;
}

static void gemm_run(const gemm_args &g)
{
    /* op(B) as n rows of k (contiguous along k), then op(A) in panels of 32 rows */
    std::vector<float> Bt((size_t)g.n * g.k);
    for (int j = 0; j < g.n; j++)
        for (int l = 0; l < g.k; l++)
            Bt[(size_t)j * g.k + l] = gemm_get(g.B, g.bt, g.tb == CUBLAS_OP_N ? CUBLAS_OP_T : CUBLAS_OP_N, j, l,
                                               g.ldb, g.round);
    const int P = 32;
    parallel_for((g.m + P - 1) / P, [&](int64_t p) {
        const int i0 = (int)p * P, i1 = i0 + P < g.m ? i0 + P : g.m;
        std::vector<float> Ap((size_t)(i1 - i0) * g.k);
        for (int i = i0; i < i1; i++)
            for (int l = 0; l < g.k; l++)
                Ap[(size_t)(i - i0) * g.k + l] = gemm_get(g.A, g.at, g.ta, i, l, g.lda, g.round);
        for (int j = 0; j < g.n; j++)
            for (int i = i0; i < i1; i++) {
                float v = g.alpha * dot(&Ap[(size_t)(i - i0) * g.k], &Bt[(size_t)j * g.k], g.k);
                const size_t c = (size_t)i + (size_t)j * g.ldc;
                if (g.ct == CUDA_R_32F) {
                    float *C = (float *)g.C;
                    C[c] = g.beta == 0.0f ? v : v + g.beta * C[c]; /* beta 0: C is not read */
                } else {
                    __half *C = (__half *)g.C;
                    C[c] = __float2half_rn(g.beta == 0.0f ? v : v + g.beta * __half2float(C[c]));
                }
            }
    });
}

} /* namespace emu */

using namespace emu;

/* ================= the runtime API ================= */

const char *cudaGetErrorName(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: break;
    }
    switch ((int)e) {
    case 401: return "cudaErrorIllegalState";
    case 900: return "cudaErrorStreamCaptureUnsupported";
    case 901: return "cudaErrorStreamCaptureInvalidated";
    case 905: return "cudaErrorStreamCaptureIsolation";
    default: return "cudaErrorUnknown";
    }
}

const char *cudaGetErrorString(cudaError_t e)
{
    static thread_local std::string s;
    s = e == cudaSuccess ? "no error" : std::string("[cuda emulator] ") + cudaGetErrorName(e);
    if (e != cudaSuccess && e == g_detail_code && !g_detail.empty())
        s += ": " + g_detail;
    return s.c_str();
}

cudaError_t cudaGetLastError(void)
{
    if (g_sticky)
        return g_sticky;
    cudaError_t e = g_last;
    g_last = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void) { return g_sticky ? g_sticky : g_last; }

cudaError_t cudaGetDeviceCount(int *n)
{
    init_once();
    *n = 1;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int d)
{
    init_once();
    return d == 0 ? cudaSuccess : api_err(cudaErrorInvalidDevice, "cudaSetDevice(%d): the emulator has device 0", d);
}

cudaError_t cudaGetDevice(int *d)
{
    *d = 0;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d)
{
    if (d != 0)
        return api_err(cudaErrorInvalidDevice, "cudaGetDeviceProperties(%d)", d);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "hydrad CUDA emulator (CPU, not a GPU)");
    /* shaped like an H100 so that size-dependent choices (e.g. wide attention) match it */
    p->totalGlobalMem = (size_t)80 << 30;
    p->sharedMemPerBlock = SMEM_STATIC;
    p->regsPerBlock = 65536;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = p->maxThreadsDim[1] = 1024;
    p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 2147483647;
    p->maxGridSize[1] = p->maxGridSize[2] = 65535;
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 132;
    p->maxThreadsPerMultiProcessor = 2048;
    p->l2CacheSize = 50 << 20;
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void)
{
    cudaError_t e = capture_forbids("cudaDeviceSynchronize");
    if (e)
        return e;
    drain_all();
    return ok_or_sticky();
}

cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b)
{
    size_t used = 0;
    for (const auto &m : g_mem)
        if (m.second.device)
            used += m.second.n;
    *total_b = (size_t)80 << 30;
    *free_b = used < *total_b ? *total_b - used : 0;
    return ok_or_sticky();
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *a, const void *fn)
{
    memset(a, 0, sizeof *a);
    a->maxThreadsPerBlock = 1024;
    a->ptxVersion = a->binaryVersion = 90;
    return fn ? cudaSuccess : api_err(cudaErrorInvalidValue, "cudaFuncGetAttributes(NULL)");
}

cudaError_t cudaMalloc(void **p, size_t n)
{
    init_once();
    *p = nullptr;
    cudaError_t e = capture_forbids("cudaMalloc");
    if (e)
        return e;
    if (g_sticky)
        return g_sticky;
    void *q = nullptr;
    if (posix_memalign(&q, 256, n ? n : 1))
        return api_err(cudaErrorMemoryAllocation, "cudaMalloc(%zu): out of host memory", n);
    if (g_poison)
        memset(q, 0xff, n); /* uninitialised device memory: NaN floats, -1 integers */
    std::lock_guard<std::mutex> lk(g_mu);
    g_mem[(uintptr_t)q] = alloc_info{n, true};
    *p = q;
    return cudaSuccess;
}

static cudaError_t free_common(void *p, bool device, const char *what)
{
    if (!p)
        return cudaSuccess;
    cudaError_t e = capture_forbids(what);
    if (e)
        return e;
    drain_all(); /* freeing memory waits for the device, as cudaFree does */
    {
        std::lock_guard<std::mutex> lk(g_mu);
        auto it = g_mem.find((uintptr_t)p);
        if (it == g_mem.end() || it->second.device != device)
            return api_err(cudaErrorInvalidValue, "%s(%p): not a pointer %s returned", what, p,
                           device ? "cudaMalloc" : "cudaHostAlloc");
        if (g_poison)
            memset(p, 0xfe, it->second.n);
        g_mem.erase(it);
    }
    free(p);
    return ok_or_sticky();
}

cudaError_t cudaFree(void *p) { return free_common(p, true, "cudaFree"); }

cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags)
{
    init_once();
    (void)flags;
    *p = nullptr;
    void *q = nullptr;
    if (posix_memalign(&q, 4096, n ? n : 1))
        return api_err(cudaErrorMemoryAllocation, "cudaHostAlloc(%zu): out of host memory", n);
    std::lock_guard<std::mutex> lk(g_mu);
    g_mem[(uintptr_t)q] = alloc_info{n, false};
    *p = q;
    return cudaSuccess;
}

cudaError_t cudaMallocHost(void **p, size_t n) { return cudaHostAlloc(p, n, 0); }
cudaError_t cudaFreeHost(void *p) { return free_common(p, false, "cudaFreeHost"); }

/* Where each side of a copy lives must agree with `k`, and device ranges stay in their
 * allocation. Pinned host memory counts as host. */
static cudaError_t check_copy(void *dst, const void *src, size_t n, cudaMemcpyKind k, int *dk, int *sk)
{
    *dk = mem_kind(dst, n);
    *sk = mem_kind(src, n);
    if (*dk < 0 || *sk < 0)
        return api_err(cudaErrorInvalidValue, "cudaMemcpy of %zu bytes runs past the end of its %s allocation", n,
                       *dk < 0 ? "destination" : "source");
    const bool dd = *dk == 1, sd = *sk == 1;
    bool ok = true;
    switch (k) {
    case cudaMemcpyHostToDevice: ok = dd && !sd; break;
    case cudaMemcpyDeviceToHost: ok = !dd && sd; break;
    case cudaMemcpyDeviceToDevice: ok = dd && sd; break;
    case cudaMemcpyHostToHost: ok = !dd && !sd; break;
    case cudaMemcpyDefault: ok = true; break;
    default: return api_err(cudaErrorInvalidMemcpyDirection, "cudaMemcpy kind %d", (int)k);
    }
    if (!ok)
        return api_err(cudaErrorInvalidValue,
                       "cudaMemcpy kind %d but the destination %p is %s and the source %p is %s memory", (int)k, dst,
                       dd ? "device" : "host", src, sd ? "device" : "host");
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k, cudaStream_t s)
{
    if (g_sticky)
        return g_sticky;
    if (!n)
        return cudaSuccess;
    int dk, sk;
    cudaError_t e = check_copy(dst, src, n, k, &dk, &sk);
    if (e)
        return e;
    emu_stream *st = stream_of(s);
    if (sk == 0 || dk == 0) {
        /* pageable host memory: the source is read now; a pageable destination waits for the
         * copy. Neither can be captured into a graph. */
        if (st->cap) {
            st->cap_bad = true;
            return api_err((cudaError_t)900, "cudaMemcpyAsync with pageable host memory while capturing");
        }
        if (dk == 0) {
            drain(st, st->enq);
            if (g_sticky)
                return g_sticky;
            memcpy(dst, src, n);
            return cudaSuccess;
        }
        std::shared_ptr<std::vector<unsigned char>> snap =
            std::make_shared<std::vector<unsigned char>>((const unsigned char *)src, (const unsigned char *)src + n);
        enqueue(s, [dst, snap] { memcpy(dst, snap->data(), snap->size()); });
        return cudaSuccess;
    }
    enqueue(s, [dst, src, n] { memmove(dst, src, n); });
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind k)
{
    cudaError_t e = capture_forbids("cudaMemcpy");
    if (e)
        return e;
    drain_all();
    if (g_sticky)
        return g_sticky;
    int dk, sk;
    if ((e = check_copy(dst, src, n, k, &dk, &sk)))
        return e;
    memmove(dst, src, n);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s)
{
    if (g_sticky)
        return g_sticky;
    if (!n)
        return cudaSuccess;
    if (mem_kind(p, n) != 1)
        return api_err(cudaErrorInvalidValue, "cudaMemsetAsync(%p, %zu bytes): not inside one device allocation", p, n);
    enqueue(s, [p, v, n] { memset(p, v, n); });
    return cudaSuccess;
}

cudaError_t cudaMemset(void *p, int v, size_t n)
{
    cudaError_t e = capture_forbids("cudaMemset");
    if (e)
        return e;
    if ((e = cudaMemsetAsync(p, v, n, nullptr)))
        return e;
    drain_all();
    return ok_or_sticky();
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags)
{
    init_once();
    emu_stream *st = new emu_stream();
    st->flags = flags;
    g_streams.push_back(st);
    *s = st;
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, 0); }

cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    if (!s)
        return api_err(cudaErrorInvalidResourceHandle, "cudaStreamDestroy(NULL)");
    emu_stream *st = (emu_stream *)s;
    drain(st, st->enq); /* queued work still completes */
    for (size_t i = 0; i < g_streams.size(); i++)
        if (g_streams[i] == st) {
            g_streams.erase(g_streams.begin() + (long)i);
            break;
        }
    if (st->cap) {
        g_capturing--;
        delete st->cap;
    }
    delete st;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    emu_stream *st = stream_of(s);
    if (st->cap) {
        st->cap_bad = true;
        return api_err((cudaError_t)900, "cudaStreamSynchronize on a stream being captured");
    }
    drain(st, st->enq);
    return ok_or_sticky();
}

cudaError_t cudaStreamQuery(cudaStream_t s)
{
    emu_stream *st = stream_of(s);
    if (g_sticky)
        return g_sticky;
    return st->done == st->enq ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags)
{
    (void)flags;
    if (!e)
        return api_err(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent with a NULL event");
    emu_stream *st = stream_of(s);
    emu_stream *es = e->s;
    const uint64_t seq = e->seq;
    if (!es || es->done >= seq)
        return ok_or_sticky();
    if (st->cap) {
        st->cap_bad = true;
        return api_err((cudaError_t)905, "cudaStreamWaitEvent while capturing, on an event recorded outside the capture");
    }
    enqueue(s, [es, seq] { drain(es, seq); });
    return ok_or_sticky();
}

cudaError_t cudaEventCreate(cudaEvent_t *e)
{
    *e = new emu_event();
    return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags)
{
    (void)flags;
    return cudaEventCreate(e);
}

cudaError_t cudaEventDestroy(cudaEvent_t e)
{
    delete e;
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
    if (!e)
        return api_err(cudaErrorInvalidResourceHandle, "cudaEventRecord with a NULL event");
    emu_stream *st = stream_of(s);
    if (st->cap) { /* an event inside a graph orders work inside it: complete as far as we care */
        e->s = nullptr;
        return ok_or_sticky();
    }
    e->s = st;
    e->seq = st->enq;
    return ok_or_sticky();
}

cudaError_t cudaEventSynchronize(cudaEvent_t e)
{
    if (e && e->s)
        drain(e->s, e->seq);
    return ok_or_sticky();
}

cudaError_t cudaEventQuery(cudaEvent_t e)
{
    if (g_sticky)
        return g_sticky;
    return !e->s || e->s->done >= e->seq ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b)
{
    (void)a;
    (void)b;
    *ms = 0.0f; /* the emulator has no GPU time to report */
    return ok_or_sticky();
}

cudaError_t cudaFuncSetAttribute(const void *fn, cudaFuncAttribute attr, int value)
{
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || (size_t)value > SMEM_OPTIN)
            return api_err(cudaErrorInvalidValue, "cudaFuncSetAttribute: %d bytes of dynamic shared memory", value);
        g_max_dyn_smem[fn] = value;
    }
    return ok_or_sticky();
}

/* ---- stream capture and graphs ---- */

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode)
{
    (void)mode;
    emu_stream *st = stream_of(s);
    if (!s)
        return api_err((cudaError_t)900, "cudaStreamBeginCapture on the legacy NULL stream");
    if (st->cap)
        return api_err((cudaError_t)401, "cudaStreamBeginCapture: the stream is already capturing");
    st->cap = new emu_graph_t();
    st->cap_bad = false;
    g_capturing++;
    return ok_or_sticky();
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g)
{
    emu_stream *st = stream_of(s);
    *g = nullptr;
    if (!st->cap)
        return api_err((cudaError_t)401, "cudaStreamEndCapture: the stream is not capturing");
    emu_graph_t *gr = st->cap;
    st->cap = nullptr;
    g_capturing--;
    if (st->cap_bad) {
        delete gr;
        return api_err((cudaError_t)901, "cudaStreamEndCapture: the capture was invalidated");
    }
    *g = gr;
    return ok_or_sticky();
}

cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus *st)
{
    emu_stream *es = stream_of(s);
    *st = !es->cap ? cudaStreamCaptureStatusNone
                   : es->cap_bad ? cudaStreamCaptureStatusInvalidated : cudaStreamCaptureStatusActive;
    return ok_or_sticky();
}

/* nodes are the captured ops (emu_op *), in capture order */
cudaError_t cudaGraphGetNodes(cudaGraph_t g, cudaGraphNode_t *nodes, size_t *n)
{
    if (!g || !n)
        return api_err(cudaErrorInvalidValue, "cudaGraphGetNodes(NULL)");
    if (nodes)
        for (size_t i = 0; i < *n && i < g->ops.size(); i++)
            nodes[i] = (cudaGraphNode_t)g->ops[i].get();
    *n = g->ops.size();
    return ok_or_sticky();
}

cudaError_t cudaGraphNodeGetType(cudaGraphNode_t node, cudaGraphNodeType *t)
{
    if (!node || !t)
        return api_err(cudaErrorInvalidValue, "cudaGraphNodeGetType(NULL)");
    *t = ((emu_op *)node)->kernel ? cudaGraphNodeTypeKernel : cudaGraphNodeTypeMemcpy;
    return ok_or_sticky();
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t g, unsigned long long flags)
{
    (void)flags;
    if (!g)
        return api_err(cudaErrorInvalidValue, "cudaGraphInstantiate(NULL)");
    emu_graph_t *e = new emu_graph_t(*g);
    *exec = (cudaGraphExec_t)e;
    return ok_or_sticky();
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s)
{
    if (!exec)
        return api_err(cudaErrorInvalidValue, "cudaGraphLaunch(NULL)");
    if (g_sticky)
        return g_sticky;
    emu_graph_t *g = (emu_graph_t *)exec;
    for (const emu_op_p &op : g->ops) {
        emu_stream *st = stream_of(s);
        if (st->cap) {
            st->cap->ops.push_back(op);
        } else {
            st->q.push_back(op);
            st->enq++;
        }
    }
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t g)
{
    delete g;
    return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e)
{
    delete (emu_graph_t *)e;
    return cudaSuccess;
}

/* ================= cuBLAS ================= */

cublasStatus_t cublasCreate(cublasHandle_t *h)
{
    init_once();
    *h = new emu_blas();
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t h)
{
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s)
{
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m)
{
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    h->math = m;
    return CUBLAS_STATUS_SUCCESS;
}

const char *cublasGetStatusName(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}

const char *cublasGetStatusString(cublasStatus_t s)
{
    return s == CUBLAS_STATUS_NOT_SUPPORTED ? "not supported by the CUDA emulator's GEMM (tests/cuda_emu)"
                                            : "see the [cuda emulator] message on stderr";
}

/* The cases kernels/ uses: A and B fp32 or fp16, C fp32 (or fp16), fp32 compute (pedantic,
 * fast-16F and fast-TF32 round the inputs like the tensor cores would), any transposes, alpha and
 * beta on the host. Anything else is NOT_SUPPORTED, so a new use fails loudly. */
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType at, int lda, const void *B,
                            cudaDataType bt, int ldb, const void *beta, void *C, cudaDataType ct, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo)
{
    (void)algo;
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    const bool types_ok = (at == CUDA_R_32F || at == CUDA_R_16F) && (bt == CUDA_R_32F || bt == CUDA_R_16F) &&
                          (ct == CUDA_R_32F || ct == CUDA_R_16F);
    const bool comp_ok = compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_PEDANTIC ||
                         compute == CUBLAS_COMPUTE_32F_FAST_16F || compute == CUBLAS_COMPUTE_32F_FAST_TF32;
    if (!types_ok || !comp_ok || (ta != CUBLAS_OP_N && ta != CUBLAS_OP_T) || (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T)) {
        set_detail(cudaErrorUnknown, "cublasGemmEx: types %d/%d/%d compute %d ops %d/%d not emulated", (int)at,
                   (int)bt, (int)ct, (int)compute, (int)ta, (int)tb);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (m < 0 || n < 0 || k < 0 || ldc < (m > 1 ? m : 1) || lda < ((ta == CUBLAS_OP_N ? m : k) > 1 ? (ta == CUBLAS_OP_N ? m : k) : 1) ||
        ldb < ((tb == CUBLAS_OP_N ? k : n) > 1 ? (tb == CUBLAS_OP_N ? k : n) : 1))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (!m || !n)
        return CUBLAS_STATUS_SUCCESS;
    gemm_args g;
    g.ta = ta;
    g.tb = tb;
    g.m = m;
    g.n = n;
    g.k = k;
    g.lda = lda;
    g.ldb = ldb;
    g.ldc = ldc;
    g.alpha = *(const float *)alpha;
    g.beta = *(const float *)beta;
    g.A = A;
    g.B = B;
    g.C = C;
    g.at = at;
    g.bt = bt;
    g.ct = ct;
    g.round = compute == CUBLAS_COMPUTE_32F_FAST_16F ? 2
              : (compute == CUBLAS_COMPUTE_32F_FAST_TF32 ||
                 (h->math == CUBLAS_TF32_TENSOR_OP_MATH && compute == CUBLAS_COMPUTE_32F))
                  ? 1
                  : 0;
    /* every operand must be one device allocation big enough for what the GEMM reads */
    const size_t ea = at == CUDA_R_32F ? 4 : 2, eb = bt == CUDA_R_32F ? 4 : 2, ec = ct == CUDA_R_32F ? 4 : 2;
    const size_t na = (size_t)lda * ((ta == CUBLAS_OP_N ? k : m) - 1) + (ta == CUBLAS_OP_N ? m : k);
    const size_t nb = (size_t)ldb * ((tb == CUBLAS_OP_N ? n : k) - 1) + (tb == CUBLAS_OP_N ? k : n);
    const size_t nc = (size_t)ldc * (n - 1) + m;
    if ((k && (mem_kind(A, na * ea) != 1 || mem_kind(B, nb * eb) != 1)) || mem_kind(C, nc * ec) != 1) {
        set_detail(cudaErrorIllegalAddress, "cublasGemmEx %dx%dx%d: an operand is not (all) in device memory", m, n, k);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (g_sticky)
        return CUBLAS_STATUS_EXECUTION_FAILED;
    enqueue(h->stream, [g] { gemm_run(g); }, true);
    return CUBLAS_STATUS_SUCCESS;
}
