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
    int32_t n_max = 64;     // longest draft per step and slot (all types; ngram-mod's own most)
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

// How many draft tokens each generating slot verifies in the next step. A CPU step costs
// about a + b·n for n tokens (a: reading the weights, b: each token's compute and its
// verification), measured online from the steps themselves; a draft token j of a slot whose
// tokens are accepted with probability α each adds α^j expected tokens at cost b (plus a draft
// model's step). Taken best first, as many as give the step the most tokens per second: at one
// stream nearly every plausible draft pays, in a compute-bound batch only the likeliest ones
// do, and a step drafts only if it expects 5 % more tokens per second than plain decoding. The
// cost curve is the measured one (the median of the last few steps of each batch size), the
// line only fills in sizes not seen.
//
// Two checks keep the model honest. When it declines drafts on offer, the 32nd such step
// verifies some anyway (as many as cost at most 4 plain steps; each probe that does not change
// its mind doubles the wait for the next), so that a cost measured on a busy machine cannot
// keep drafts off for good. And per number of generating slots, the tokens per second that
// steps with drafts really gave are compared with those of plain steps: where drafting loses,
// it stays off (but for one step in 16, to see whether that changed); plain decoding's rate is
// the plain steps' where there are any (one step in 64 is then plain, to keep it current),
// else the cost curve's.
class draft_policy {
public:
    draft_policy();
    struct slot_in {
        int32_t n_avail    = 0;    // draft tokens on offer (the draft, or the most a draft model may make)
        double  acceptance = 0.5;  // per-token acceptance estimate
        bool    model      = false;  // drafted by the draft model: each new depth costs a step of it
        int32_t seq        = -1;     // its sequence id (-1: its index)
        int32_t n_room     = -1;     // most tokens it may verify (-1: n_avail); past n_avail, padding
    };

    // How llama.cpp cuts a batch into ubatches: with one KV stream (a unified cache, or one
    // slot) chunks of `n_ubatch`; with a stream per slot, each ubatch takes as many tokens from
    // every sequence of a run of consecutive ids as the shortest of them has (split_equal), so
    // that ragged drafts cost extra ubatches, each reading all the weights again. `budget`: the
    // most draft tokens one step may verify.
    void set_layout(bool stream_per_seq, int32_t n_ubatch, int32_t budget);
    bool pads() const { return stream_per_seq_; }  // allocate() may give a slot more than its draft
    // The ubatch sizes of a step whose generating sequences `seqs` (ascending) have `len`
    // tokens each, plus `n_other` prompt tokens.
    std::vector<int32_t> split(const std::vector<int32_t> & seqs, std::vector<int32_t> len, int32_t n_other) const;

    // A target step without prefill: its decode and verification of `n_tokens` tokens.
    void observe_decode(int32_t n_tokens, double ms);
    void observe_draft_step(double ms);  // one batched step of the draft model
    // A whole step without prefill: `n_gen` generating slots, `n_drafted` draft tokens
    // verified, `n_committed` tokens committed, in `ms`, of which `ms_drafting` before the decode.
    void observe_step(int32_t n_gen, int32_t n_drafted, int32_t n_committed, double ms, double ms_drafting = -1);

    // Draft tokens to verify per slot. `n_gen`: generating slots (one token each), `n_other`:
    // prefill tokens in the same step, `gen_seqs`: the generating slots' sequence ids, ascending
    // (empty: 0 .. n_gen - 1). With a stream per slot and several slots generating, every slot
    // gets the same depth (split_equal then decodes the step in as few ubatches as plain
    // decoding): a slot with a shorter draft is padded up to it (up to its n_room), the padding
    // costing rows but no ubatch, and counting for no expected token.
    std::vector<int32_t> allocate(const std::vector<slot_in> & slots, int32_t n_gen, int32_t n_other,
                                  const std::vector<int32_t> & gen_seqs = {});

    double step_ms(int32_t n_tokens) const;  // a step of n tokens, from what was measured
    double cost_fixed_ms() const;     // a
    double cost_per_token_ms() const; // b
    double draft_step_ms() const { return draft_ms_; }
    // Realized tokens per ms at `n_gen` slots, plain and with drafts (0: not measured).
    double rate_plain(int32_t n_gen) const;
    double rate_spec(int32_t n_gen) const;

    static constexpr int32_t PROBE_EVERY = 32;        // declined steps before a probe (at first)
    static constexpr int32_t PROBE_GAP_MAX = 1024;    // ... doubling after each, up to this
    static constexpr double  PROBE_COST  = 4.0;       // a probe costs at most this many plain steps
    static constexpr int32_t HOLD_EVERY  = 16;        // held-back steps between drafting ones
    static constexpr int32_t PLAIN_EVERY = 64;        // drafting steps between plain ones
    static constexpr int32_t N_RECENT    = 5;         // steps of a size its cost is the median of

private:
    static constexpr int32_t N_BUCKETS = 257;
    struct bucket {
        double  recent[N_RECENT] = {};
        int32_t n = 0;        // observations kept (up to N_RECENT)
        int32_t next = 0;     // ring position
        bool    first = true; // no step of this size seen yet
        bool    provisional = false;  // only the first seen (it may have paid one-time costs)
        double  ms = 0;       // the median of `recent`
    };
    bucket  cost_[N_BUCKETS];
    double  a_ = 0, b_ = 0;  // the fit, refreshed on each observation
    bool    stream_per_seq_ = false;
    int32_t n_ubatch_ = 512;
    int32_t budget_ = 1 << 20;
    double  batch_ms(const std::vector<int32_t> & seqs, const std::vector<int32_t> & len, int32_t n_other) const;
    double  draft_ms_ = 0;
    double  overhead_ms_ = 0;  // a step's time before its decode (the n-gram lookups, ...)
    void refit();

    // Realized throughput per number of generating slots: running means of tokens and of
    // milliseconds per step, plain and with drafts.
    struct realized {
        double  tok = 0, ms = 0;
        int32_t n = 0;
        void add(double t, double m);
        double rate() const { return ms > 0 ? tok / ms : 0.0; }
    };
    struct guard {
        realized plain, spec;
        int32_t  since_plain = 0;  // drafting steps since the last plain one
        int32_t  held = 0;         // steps drafting was held back while it loses
    };
    std::vector<guard> guard_;
    int32_t n_declined_ = 0;  // steps the model declined drafts on offer, since the last probe
    int32_t probe_gap_  = PROBE_EVERY;
    int32_t n_probes_   = 0;  // probes made (their size goes in turn)
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
