// Speculative decoding: who drafts, how much of each draft is worth verifying, and the draft
// model's KV cache. Drafting itself is llama.cpp's common/speculative library (the draft
// model, and the n-gram methods); our part is the scheduling around it.
//
// Thread safety: the constructor on the engine's owning thread, everything else on the decode
// thread. `draft_policy` is a pure value type (unit-tested through _core.testing).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "llama-cpp.h"
#include "speculative.h"

namespace llamabox {

class model;

struct ngram_map_params {
    int32_t size_n   = 12;  // n-gram looked up
    int32_t size_m   = 48;  // m-gram drafted after it
    int32_t min_hits = 1;
};

struct speculative_params {
    // Drafting types, by llama.cpp's names (draft-simple, ngram-simple, ngram-map-k,
    // ngram-map-k4v, ngram-mod, ngram-cache; "draft" = draft-simple). Empty: draft-simple
    // when a draft model is given, else none.
    std::vector<std::string> types;
    int32_t n_max = 48;     // longest draft per step and slot (all types)
    int32_t n_min = 0;      // shorter drafts are not verified
    float   p_min = 0.75f;  // draft model: stop at a token below this probability
    bool    adaptive = true;  // verify only the draft tokens that pay for themselves

    std::string draft_model;            // GGUF of the draft model
    int32_t     draft_n_gpu_layers = -1;
    int32_t     draft_n_ctx        = 0;  // 0 = the target's context size
    int32_t     draft_n_threads    = 0;  // 0 = the target's
    int32_t     draft_n_threads_batch = 0;
    std::string draft_cache_type_k = "f16";
    std::string draft_cache_type_v = "f16";
    std::vector<std::string> draft_devices;  // backend device names; empty = the default

    ngram_map_params ngram_simple;
    ngram_map_params ngram_map_k;
    ngram_map_params ngram_map_k4v;
    int32_t ngram_mod_n_match = 24;
    int32_t ngram_mod_n_min   = 48;
    int32_t ngram_mod_n_max   = 64;
    std::string lookup_cache_static;   // ngram-cache files (llama.cpp's lookup format)
    std::string lookup_cache_dynamic;
};

// The names of the drafting types, and their bits in a type mask.
uint32_t speculative_type_bit(const std::string & name);  // 0: unknown
constexpr uint32_t SPEC_DRAFT_BIT = 1u << COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE;  // the draft model
std::string speculative_type_name(int32_t type);
std::vector<std::string> speculative_type_names();
int32_t speculative_first_type(uint32_t mask);  // the type tried first; -1 for none

// How many draft tokens each generating slot verifies in the next step. A CPU decode costs
// about a + b·n for n tokens (a: reading the weights, b: each token's compute), fitted online
// from the steps themselves; a draft token j of a slot whose tokens are accepted with
// probability α each adds α^j expected tokens at cost b (plus a draft model's step). Taken
// best first, as many as give the step the most tokens per second: at one stream nearly
// every plausible draft pays, in a compute-bound batch only the likeliest ones do, and a
// step drafts only if it expects 5 % more tokens per second than plain decoding. The cost curve is the
// measured one (a running mean per batch size), the line only fills in sizes not seen.
class draft_policy {
public:
    draft_policy();
    struct slot_in {
        int32_t n_avail    = 0;    // draft tokens on offer (the draft, or the most a draft model may make)
        double  acceptance = 0.5;  // per-token acceptance estimate
        bool    model      = false;  // drafted by the draft model: each new depth costs a step of it
    };

    void observe_decode(int32_t n_tokens, double ms);  // a target decode without prefill
    void observe_draft_step(double ms);                // one batched step of the draft model

    // Draft tokens to verify per slot. `n_gen`: generating slots (one token each), `n_other`:
    // prefill tokens in the same step.
    std::vector<int32_t> allocate(const std::vector<slot_in> & slots, int32_t n_gen, int32_t n_other) const;

    double step_ms(int32_t n_tokens) const;  // a decode of n tokens, from what was measured
    double cost_fixed_ms() const;     // a
    double cost_per_token_ms() const; // b
    double draft_step_ms() const { return draft_ms_; }

private:
    // The decode time per batch size: a running mean for each size seen (sizes keep what was
    // learnt of them however long other sizes run), fitted as a + b·n over the sizes seen.
    static constexpr int32_t N_BUCKETS = 257;
    double  ms_[N_BUCKETS] = {};
    int32_t seen_[N_BUCKETS] = {};
    bool    first_[N_BUCKETS] = {};  // set by the constructor: no decode of this size seen yet
    double  a_ = 0, b_ = 0;  // the fit, refreshed on each observation
    double  draft_ms_ = 0;
    void refit();
};

// Updates a per-token acceptance estimate after a verification: `n_accepted` of `n_drafted`.
double update_acceptance(double prior, int32_t n_drafted, int32_t n_accepted);

class speculator {
public:
    // Loads the draft model if one is given; checks it against the target (vocabulary, BOS,
    // EOS); throws load_error naming both models.
    speculator(const speculative_params & params, const model & target, const std::string & target_path,
               llama_context * ctx_tgt, bool kv_unified, int32_t n_threads, int32_t n_threads_batch);
    ~speculator();
    speculator(const speculator &) = delete;
    speculator & operator=(const speculator &) = delete;

    uint32_t default_types() const { return types_; }  // the server's types (mask)
    uint32_t available_types() const;                  // types a request may ask for
    int32_t  n_max() const { return params_.n_max; }
    int32_t  n_min() const { return params_.n_min; }
    float    p_min() const { return params_.p_min; }
    bool     adaptive() const { return params_.adaptive; }
    bool     has_draft_model() const { return dft_ctx_ != nullptr; }
    draft_policy & policy() { return policy_; }

    // A sequence starts generating with `history` in its KV cache.
    void begin(int32_t seq, uint32_t types, const std::vector<llama_token> & history);

    // The target decoded a step without prefill: `n_tokens` tokens in `ms`.
    void observe_decode(int32_t n_tokens, double ms) { policy_.observe_decode(n_tokens, ms); }
    // The running per-token acceptance of a type over all requests: a new request's prior.
    double acceptance(int32_t type) const;

    struct draft_job {
        int32_t  seq = 0;
        uint32_t types = 0;
        int32_t  n_max = 0;      // at most this many tokens
        int32_t  n_min = 0;      // a shorter draft is dropped
        float    p_min = 0;
        llama_token id_last = LLAMA_TOKEN_NULL;  // the token going into the step at `pos0`
        const std::vector<llama_token> * history = nullptr;  // tokens at positions 0..pos0-1
        std::vector<llama_token> * result = nullptr;
        int32_t * type_used = nullptr;
        int32_t * n_synced  = nullptr;  // of history, held in the draft model's KV (updated)
        // Set by the draft model: how many tokens from pos0 on (id_last, then drafted ones) its
        // KV now holds; the caller keeps those the target accepts (see forget_from).
        int32_t * n_tail    = nullptr;
    };
    // Drafts for the jobs that have no draft yet: with the n-gram types (`model` false, cheap),
    // or with the draft model (`model` true; first catches its KV up to each job's history,
    // at most a batch of tokens a call: a job still behind gets no draft this time).
    void draft(std::vector<draft_job> & jobs, bool model);

    // After a verification: `n_accepted` of the `n_drafted` tokens from `type` were accepted;
    // the drafting type is told `n_told` (see engine::verify).
    void accept(int32_t seq, int32_t type, int32_t n_drafted, int32_t n_accepted, int32_t n_told);
    // The draft model's KV of `seq` from `pos` on goes (rejected tokens, a new prompt).
    // Returns false if llama.cpp refused, after dropping the whole sequence.
    bool forget_from(int32_t seq, llama_pos pos);

private:
    common_speculative * instance(int32_t type, float p_min);
    void run(common_speculative * spec, std::vector<draft_job *> & jobs);
    bool sync_draft(std::vector<draft_job *> & jobs);

    speculative_params params_;
    uint32_t types_ = 0;
    int32_t  n_seq_ = 1;
    int32_t  n_batch_ = 512;
    llama_context * ctx_tgt_ = nullptr;
    std::unique_ptr<model> dft_model_;
    llama_context_ptr dft_ctx_;
    // One common_speculative per n-gram type, and one per p_min for the draft model (its p_min
    // is fixed at init); made on first use.
    std::map<int32_t, common_speculative_ptr> ngram_;
    std::map<float, common_speculative_ptr>   dft_;
    std::map<int32_t, double> acceptance_;  // per type, over all requests
    draft_policy policy_;
    llama_batch  batch_ {};
};

}  // namespace llamabox
