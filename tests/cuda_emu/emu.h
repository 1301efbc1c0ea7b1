// A small CUDA execution model on the CPU, for running the retention kernels' own source in tests.
//
// Each CUDA thread of a block is a fiber with its own stack; the blocks of a grid run one after another
// (the kernels never communicate between blocks). __syncthreads() is a barrier over the
// block's fibers, and the warp-collective operations (mma.sync, __syncwarp) are barriers over a warp's
// 32 fibers. A fiber runs alone until it reaches a barrier; which fiber runs next is chosen by the
// launch's `schedule`:
//   0   round robin in thread order: all threads advance one barrier at a time, as if in lockstep;
//   1   greedy, lowest thread first: the runnable thread with the lowest index always runs next, so
//       low warps run as far ahead of the others as the barriers allow;
//   2   greedy, highest thread first;
//   >2  greedy with a random priority order (seeded by `schedule`), drawn afresh at every block barrier.
// A thread that reads shared memory another thread writes, with no barrier between them that both
// pass, reads the value from before the write under one of these orders and the value from after under
// another; so the tests run each kernel under several schedules and compare the results bit for bit.
//
// Shared memory starts filled with 0xFF bytes (a NaN in every float and 16-bit float format), so a
// read of a shared element that nothing wrote poisons the result. A thread that leaves while others
// wait at a barrier, or a barrier that not every thread reaches, is reported as a deadlock.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <random>
#include <string>
#include <vector>

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// Switching between fibers: on x86-64 a few instructions that swap the callee-saved registers and the
// stack pointer (ucontext's swapcontext also saves the signal mask, a system call per switch, which made
// the tests ten times slower); elsewhere ucontext.
#if defined(__x86_64__) && !defined(SEQMIXERS_EMU_UCONTEXT)
#define SEQMIXERS_EMU_ASM_SWITCH 1
extern "C" __attribute__((visibility("hidden"))) void seqmixers_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl seqmixers_emu_switch
    .hidden seqmixers_emu_switch
    .type seqmixers_emu_switch, @function
seqmixers_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size seqmixers_emu_switch, .-seqmixers_emu_switch
)");
#endif

namespace emu {

struct Barrier {
    int expected = 0;
    int arrived = 0;
    unsigned long long generation = 0;
};

struct Fiber {
    ucontext_t ctx;
    void* sp = nullptr;  // saved stack pointer (assembly switch)
    char* stack = nullptr;
    uint3 tid{0, 0, 0};
    int linear = 0;
    bool done = false;
    Barrier* waiting = nullptr;
    unsigned long long wait_gen = 0;
};

struct Warp {
    Barrier bar;
    uint32_t a[2][32][4];  // fragments handed in, double-buffered by the parity of the warp's MMA count
    uint32_t b[2][32][2];
    unsigned long long mmas[32] = {};  // MMAs each lane has issued
};

constexpr size_t kStackBytes = 256 * 1024;

struct Machine {
    dim3 grid, block;
    size_t smem_bytes = 0;
    long long schedule = 0;
    uint3 block_idx{0, 0, 0};
    std::vector<float> smem;  // float storage keeps it 4-byte aligned; vector<float> data is 16-aligned
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;
    Fiber* cur = nullptr;
    ucontext_t sched;
    void* sched_sp = nullptr;
    Barrier block_bar;
    std::vector<Warp> warps;
    std::string error;
    std::function<void()> body;
};

inline Machine& m() {
    static Machine machine;
    return machine;
}

inline void yield() {
#ifdef SEQMIXERS_EMU_ASM_SWITCH
    seqmixers_emu_switch(&m().cur->sp, m().sched_sp);
#else
    swapcontext(&m().cur->ctx, &m().sched);
#endif
}

inline void resume(Fiber& f) {
#ifdef SEQMIXERS_EMU_ASM_SWITCH
    seqmixers_emu_switch(&m().sched_sp, f.sp);
#else
    swapcontext(&m().sched, &f.ctx);
#endif
}

// Report an error and park this fiber for good; the scheduler abandons the block.
inline void fail(const std::string& why) {
    Machine& M = m();
    if (M.error.empty()) M.error = why;
    for (;;) yield();
}

inline void arrive(Barrier& bar) {
    Fiber* f = m().cur;
    f->waiting = &bar;
    f->wait_gen = bar.generation;
    if (++bar.arrived == bar.expected) {
        bar.arrived = 0;
        ++bar.generation;
    }
    yield();  // always give way here, so that the schedule decides who runs next
}

inline bool blocked(const Fiber& f) { return f.waiting != nullptr && f.waiting->generation == f.wait_gen; }

inline void trampoline() {
    Machine& M = m();
    M.body();
    M.cur->done = true;
#ifdef SEQMIXERS_EMU_ASM_SWITCH
    yield();  // never resumed: a finished fiber is not scheduled again
#endif
    // (ucontext: returning resumes uc_link, the scheduler)
}

// A fresh fiber's stack: switching to it "returns" into trampoline() as if it had been called, with
// the stack aligned as the ABI wants at a function's entry.
inline void prepare(Fiber& f) {
#ifdef SEQMIXERS_EMU_ASM_SWITCH
    uintptr_t top = ((uintptr_t)(f.stack + kStackBytes)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;                          // trampoline's (never used) return address
    *--sp = (void*)&trampoline;               // where the switch's `ret` goes
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12 .. r15
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &m().sched;
    makecontext(&f.ctx, trampoline, 0);
#endif
}

inline bool run_block(std::mt19937_64& rng) {
    Machine& M = m();
    const int n = (int)(M.block.x * M.block.y * M.block.z);
    std::memset(M.smem.data(), 0xFF, M.smem.size() * sizeof(float));
    M.block_bar = Barrier{};
    M.block_bar.expected = n;
    M.warps.assign((n + 31) / 32, Warp{});
    for (size_t w = 0; w < M.warps.size(); ++w) M.warps[w].bar.expected = std::min(32, n - 32 * (int)w);
    M.fibers.assign(n, Fiber{});
    while ((int)M.stacks.size() < n) M.stacks.push_back(static_cast<char*>(std::malloc(kStackBytes)));
    for (int i = 0; i < n; ++i) {
        Fiber& f = M.fibers[i];
        f.linear = i;
        f.tid = uint3{(unsigned)(i % M.block.x), (unsigned)((i / M.block.x) % M.block.y),
                      (unsigned)(i / (M.block.x * M.block.y))};
        f.stack = M.stacks[i];
        prepare(f);
    }
    std::vector<int> order(n);  // round robin: the visiting order; greedy: the priority order
    for (int i = 0; i < n; ++i) order[i] = M.schedule == 2 ? n - 1 - i : i;
    const bool greedy = M.schedule >= 1;
    unsigned long long block_generation = ~0ull;
    for (;;) {
        if (M.schedule > 2 && block_generation != M.block_bar.generation) {
            std::shuffle(order.begin(), order.end(), rng);
            block_generation = M.block_bar.generation;
        }
        bool ran = false, all_done = true;
        for (int i : order) {
            Fiber& f = M.fibers[i];
            if (f.done) continue;
            all_done = false;
            if (blocked(f)) continue;
            f.waiting = nullptr;
            M.cur = &f;
            resume(f);
            M.cur = nullptr;
            ran = true;
            if (!M.error.empty()) return false;
            if (greedy) break;  // start again from the highest priority
        }
        if (all_done) return true;
        if (!ran) {
            M.error = "deadlock: some threads wait at a barrier that the others never reach (or have left)";
            return false;
        }
    }
}

// Run `body` on every thread of every block of the configured grid; 0 on success.
inline int launch(std::function<void()> body) {
    Machine& M = m();
    M.error.clear();
    M.body = std::move(body);
    M.smem.assign((M.smem_bytes + 3) / 4 + 4, 0.f);
    std::mt19937_64 rng((unsigned long long)M.schedule);
    for (unsigned z = 0; z < M.grid.z; ++z)
        for (unsigned y = 0; y < M.grid.y; ++y)
            for (unsigned x = 0; x < M.grid.x; ++x) {
                M.block_idx = uint3{x, y, z};
                if (!run_block(rng)) return 1;
            }
    return 0;
}

inline float* dynamic_smem() { return m().smem.data(); }
inline unsigned dynamic_smem_bytes() { return (unsigned)m().smem_bytes; }

inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t float_to_bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline float half_to_float(uint16_t h) {
    static const std::vector<float> table = [] {  // every float16 value, converted once (exactly)
        std::vector<float> t(65536);
        for (uint32_t i = 0; i < 65536; ++i) {
            const uint16_t bits = (uint16_t)i;
            _Float16 x;
            std::memcpy(&x, &bits, 2);
            t[i] = (float)x;
        }
        return t;
    }();
    return table[h];
}
inline uint16_t float_to_half(float f) {
    _Float16 x = (_Float16)f;  // IEEE round to nearest even
    uint16_t h;
    std::memcpy(&h, &x, 2);
    return h;
}
inline uint32_t load32(const void* p) {
    uint32_t u;
    std::memcpy(&u, p, 4);
    return u;
}

inline void store32(void* p, uint32_t u) { std::memcpy(p, &u, 4); }

inline Warp& my_warp(int& lane) {
    Machine& M = m();
    lane = M.cur->linear % 32;
    return M.warps[M.cur->linear / 32];
}

inline void syncwarp() {
    int lane;
    arrive(my_warp(lane).bar);
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: every lane hands in its fragments, waits for the
// warp, then computes its own four outputs from the whole warp's fragments (PTX ISA fragment layout).
// The fragments of consecutive MMAs go to alternate buffers: a lane can hand in the next ones only after
// the whole warp has arrived there, that is, after every lane is done reading these.
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    int lane;
    Warp& w = my_warp(lane);
    if (w.bar.expected != 32) fail("mma.sync needs a full warp");
    const int buf = (int)(w.mmas[lane]++ & 1);
    std::memcpy(w.a[buf][lane], a, sizeof(w.a[buf][lane]));
    w.b[buf][lane][0] = b0;
    w.b[buf][lane][1] = b1;
    arrive(w.bar);
    auto elem = [](uint32_t reg, int k) {  // element k % 2 of a register: the high half for odd k
        return bits_to_float((k & 1) ? (reg & 0xffff0000u) : (reg << 16));
    };
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        double acc = d[i];
        for (int k = 0; k < 16; ++k) {
            const uint32_t areg = w.a[buf][(row % 8) * 4 + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
            const uint32_t breg = w.b[buf][col * 4 + (k % 8) / 2][k >= 8 ? 1 : 0];
            acc += (double)elem(areg, k) * (double)elem(breg, k);
        }
        d[i] = (float)acc;
    }
}

}  // namespace emu

#define threadIdx (emu::m().cur->tid)
#define blockIdx (emu::m().block_idx)
#define blockDim (emu::m().block)
#define gridDim (emu::m().grid)
inline void __syncthreads() { emu::arrive(emu::m().block_bar); }

extern "C" __attribute__((visibility("default"))) void emu_configure(long long gx, long long gy, long long gz, long long bx, long long by, long long bz,
                                     long long smem_bytes, long long schedule) {
    emu::Machine& M = emu::m();
    M.grid = dim3{(unsigned)gx, (unsigned)gy, (unsigned)gz};
    M.block = dim3{(unsigned)bx, (unsigned)by, (unsigned)bz};
    M.smem_bytes = (size_t)smem_bytes;
    M.schedule = schedule;
}

extern "C" __attribute__((visibility("default"))) const char* emu_last_error() { return emu::m().error.c_str(); }
