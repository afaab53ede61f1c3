// The engine: one thread owns the generation context (KV memory, samplers, the embedding
// context) and runs the decode loop; requests come in and events go out through locked queues.
//
// Thread safety, per method:
//   constructor, destructor, start(), stop()    the owning thread (Python: the event loop's)
//   prepare()                                   any thread; the slow part (tokenize, grammar,
//                                               sampler), touches no decode-thread state
//   submit(), cancel(), poll_events(), stats()  any thread; O(1) per request, never wait on a decode
//   tokenize(), detokenize(), token_piece(),
//   apply_chat_template(), info()               any thread (read-only model state)
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "errors.h"
#include "llama-cpp.h"
#include "log_sink.h"
#include "media.h"
#include "request.h"
#include "rpc.h"
#include "speculator.h"
#include "worker_pool.h"

namespace llamabox {

class embedder;
class model;
struct slot;
struct task;
struct task_speculation;

struct lora_adapter_params {
    std::string path;
    float       scale = 1.0f;
};

// A loaded LoRA adapter as /lora-adapters shows it.
struct lora_adapter_info {
    int32_t     id = 0;
    std::string path;
    float       scale = 0.0f;  // the server's current scale (requests without their own)
};

struct engine_params {
    std::string model_path;
    int32_t     n_ctx           = 4096;  // whole context, split over the slots; 0 = training context
    int32_t     n_parallel      = 1;
    int32_t     n_batch         = 2048;
    int32_t     n_ubatch        = 512;
    int32_t     n_threads       = 0;     // 0 = physical cores
    int32_t     n_threads_batch = 0;     // 0 = n_threads
    int32_t     n_gpu_layers    = -1;
    int32_t     flash_attn      = -1;    // -1 auto, 0 off, 1 on
    std::string cache_type_k    = "f16";
    std::string cache_type_v    = "f16";
    bool        use_mmap        = true;
    bool        use_mlock       = false;
    bool        repack          = true;  // repacked CPU weight layouts (faster; batch-dependent numerics)
    int64_t     seed            = -1;    // default seed of requests without one; < 0 = random
    bool        kv_unified      = false;
    bool        swa_full        = true;
    int32_t     n_queue_max     = 256;
    bool        embeddings      = false;
    int32_t     pooling         = -1;    // llama_pooling_type; -1 = the model's
    std::string chat_template;           // built-in name or Jinja source; empty = the model's or a fallback
    speculative_params speculative;      // drafting: none unless types or a draft model are given
    std::vector<std::string> rpc_servers;  // host:port of ggml RPC servers whose devices take layers
    std::vector<lora_adapter_params> loras;  // LoRA adapters, ids in this order
    bool        lora_init_without_apply = false;  // loaded at scale 0 (set later: set_lora_scales)
    media_params media;                  // --mmproj and its settings; no path: text only
    std::shared_ptr<load_progress> progress;  // the model's load, for the caller to watch; may be null
    bool        verbose         = false;
};

// Requests validated and ready to submit: prompt tokenized once, a sampler per choice.
struct prepared {
    prepared();
    ~prepared();
    prepared(prepared &&) noexcept;
    prepared & operator=(prepared &&) noexcept;

    std::vector<std::unique_ptr<task>> tasks;
    int32_t n_prompt = 0;  // tokens of the (shared) prompt
};

// The outcome of a job run on the engine's worker threads (see engine::post_prepare).
struct job_result {
    uint64_t                 id_job = 0;
    std::exception_ptr       error;   // set: the job threw this
    prepared                 prep;    // post_prepare
    std::vector<llama_token> tokens;  // post_tokenize
    std::string              text;    // post_detokenize, post_template
    std::unique_ptr<chat_render> chat;  // post_chat
};

class engine {
public:
    explicit engine(const engine_params & params);  // loads the model; throws load_error
    ~engine();
    engine(const engine &) = delete;
    engine & operator=(const engine &) = delete;

    void start();  // starts the decode thread
    void stop();   // cancels everything in flight and joins; idempotent

    // One task per id (n > 1: choices of one prompt, choice j seeded with seed + j). Tokenizes
    // a text prompt, checks it against the vocabulary and the slot context, builds the samplers
    // (grammar, JSON schema). Throws invalid_request or context_length_error.
    prepared prepare(request && req, const std::vector<uint64_t> & ids) const;
    // Queues all of them or none (queue_full, engine_stopped).
    void submit(prepared && p);
    void cancel(uint64_t id_req);      // unknown or finished ids are ignored
    std::vector<event> poll_events();  // never waits
    // Why the engine can no longer generate (a ggml RPC server went away: rpc.h); empty while
    // it can. Once set, it stays: submit() refuses with it and the decode thread is stuck for good.
    std::string failure() const;
    int  notify_fd() const { return pipe_rd_; }  // readable when there are events or job results

    // Jobs: the slow parts above, run on the engine's low-priority worker threads. Each returns
    // at once; its job_result comes out of poll_jobs() after the same wake-up as events, so
    // the caller's thread never waits for the work and the work runs in parallel.
    void post_prepare(uint64_t id_job, request && req, std::vector<uint64_t> ids);
    void post_tokenize(uint64_t id_job, std::string text, bool add_special, bool parse_special);
    void post_detokenize(uint64_t id_job, std::vector<llama_token> tokens);
    void post_template(uint64_t id_job, std::string messages_json, bool add_generation_prompt);
    void post_chat(uint64_t id_job, std::string inputs_json);
    std::vector<job_result> poll_jobs();  // never waits

    // A slot's KV cache to a file, back, or dropped, on the decode thread between steps (the
    // slot must be idle). Its job_result's text is the outcome as a JSON object: save
    // {"n_saved", "n_written", "ms"}, restore {"n_restored", "n_read", "ms"}, erase {"n_erased"};
    // an invalid_request error when the slot is busy, unknown or the file cannot be used.
    enum class slot_action { save, restore, erase };
    void post_slot_action(uint64_t id_job, int32_t id_slot, slot_action action, std::string path);

    engine_stats stats() const;

    // The loaded LoRA adapters and the server's current scales; set_lora_scales replaces them
    // with (id, scale) pairs, the adapters not named off (invalid_request for an unknown id or
    // a scale that is not finite). Requests prepared afterwards that give no adapters of their
    // own use the new scales. Any thread.
    std::vector<lora_adapter_info> lora_adapters() const;
    void set_lora_scales(const std::vector<std::pair<int32_t, float>> & scales);
    const model_info & info() const { return info_; }

    std::vector<llama_token> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    std::string detokenize(const std::vector<llama_token> & tokens) const;
    std::string token_piece(llama_token token) const;  // raw bytes, special tokens rendered
    // messages: OpenAI-style JSON array. Returns the prompt text.
    std::string apply_chat_template(const std::string & messages_json, bool add_generation_prompt) const;
    // What marks each media input's place in a prompt text (request::media); empty without a projector.
    std::string media_marker() const { return media_ ? media_->marker() : std::string(); }
    chat_render apply_chat(const std::string & inputs_json) const;  // see model::apply_chat

private:
    void loop();
    task_speculation resolve_speculation(const speculative_override & o) const;
    void intake(std::vector<std::unique_ptr<task>> & incoming, std::vector<uint64_t> & cancels);
    void assign_slots();
    void run_embeddings();
    void run_generation();
    // The media input (or, for a causal one, the next n_ubatch rows of it) of the oldest slot
    // whose prefill has reached one: its own decode, embeddings cannot share a batch with tokens.
    void run_media();
    void plan_drafts();  // this step's draft for each generating slot (step.cpp)
    void measure_step_costs();  // at start: what steps of the sizes drafting makes cost (step.cpp)
    void commit_slot(slot & s, int32_t n_added);
    void prefill_done(slot & s);  // the prompt's last token goes into the next step
    void verify(slot & s);        // samples the slot's outputs, accepts what matches its draft
    void shadow_check(task & t, llama_token tok);  // an unverified draft against what came
    // One sampled token out to the request: logprobs, stop strings, limits. NONE: go on.
    finish_reason emit_token(slot & s, llama_token tok, int32_t i_out);
    void finish(slot & s, finish_reason reason, const std::string & error = {});
    void fail_slot(slot & s, const std::string & error);  // drops its KV too
    // KV and cache from index n on (from the start of a span n falls inside); false: all dropped
    bool forget_from(slot & s, size_t n);
    bool evict_idle_cache();  // drops the least recently used idle slot's cached prefix
    void flush_events();
    void notify_locked();  // under mtx_out_: one byte on the pipe unless one is pending
    void post_job(uint64_t id_job, std::function<void(job_result &)> fn);
    void publish_stats();
    struct slot_op {
        uint64_t    id_job  = 0;
        int32_t     id_slot = 0;
        slot_action action  = slot_action::erase;
        std::string path;
    };
    void run_slot_op(const slot_op & op, job_result & r);  // decode thread
    struct decode_result {
        bool    ok        = true;
        int32_t ret       = 0;  // llama_decode's code
        int32_t n_tokens  = 0;  // tokens in the batch
        int32_t n_prefill = 0;  // of which prompt tokens (they can be shed)
        int32_t n_gen     = 0;  // generating slots in the batch
        int32_t n_drafted = 0;  // draft tokens in the batch
        int32_t n_ubatches = 0; // what llama.cpp cuts it into (with speculation on)
    };
    decode_result decode_step(int32_t n_prefill_max, bool with_drafts);
    // Requests under different adapter scales never share a decode: each step serves one set
    // (step_lora_), the one of the busy slot that has waited longest since its last step.
    void pick_step_lora();
    bool in_step(const slot & s) const;  // its request runs under this step's adapters
    bool apply_lora(const std::vector<float> & scales);  // on ctx_, when they differ from now
    std::vector<float> resolve_lora(const request & req) const;
    // (id, scale) pairs as a scale per adapter, the others 0; throws invalid_request
    std::vector<float> lora_scales_of(const std::vector<std::pair<int32_t, float>> & pairs) const;

    engine_params        params_;
    log_verbose_guard    log_verbose_;
    std::unique_ptr<model> model_;
    std::unique_ptr<media_projector> media_;  // with --mmproj; freed before the model
    // Declared between the model and the contexts: freed after every context that uses them,
    // before the model they belong to.
    std::vector<llama_adapter_lora_ptr> loras_;
    std::vector<std::string> lora_paths_;
    std::vector<float>   lora_scales_;   // the server's current scales, under mtx_lora_
    mutable std::mutex   mtx_lora_;
    std::vector<float>   lora_applied_;  // what ctx_ has now (decode thread)
    std::vector<float>   step_lora_;     // what this step runs under (decode thread)
    llama_context_ptr    ctx_;
    std::unique_ptr<embedder> emb_;
    std::unique_ptr<speculator> spec_;  // null when speculation is off
    int32_t n_draft_step_max_ = 0;      // draft tokens one step may verify, all slots together
    bool trace_spec_ = false;           // LLAMABOX_SPEC_TRACE=1: each step's draft sizes on stderr
    int32_t n_committed_step_ = 0;      // tokens the step being verified committed
    bool calibrate_pending_ = false;    // measure_step_costs() first thing on the engine thread
    model_info           info_;
    std::unique_ptr<worker_pool> workers_;  // destroyed first: its jobs use the model

    // decode-thread state
    std::vector<std::unique_ptr<slot>> slots_;
    std::deque<std::unique_ptr<task>>  pending_;      // generation requests waiting for a slot
    std::deque<std::unique_ptr<task>>  pending_emb_;  // embedding requests waiting for a batch
    llama_batch batch_ {};
    uint64_t    clock_ = 0;  // logical time for arrival order and LRU
    std::vector<event> out_;  // this step's events

    // totals, written by the decode thread, read under mtx_stats_
    mutable std::mutex mtx_stats_;
    engine_stats       stats_;

    // in: requests and cancellations
    std::mutex                          mtx_in_;
    std::condition_variable             cv_in_;
    std::vector<std::unique_ptr<task>>  inbox_;
    std::vector<uint64_t>               cancels_;
    std::vector<slot_op>                slot_ops_;
    bool                                stopping_ = false;
    // For submit's bound on waiting requests, kept exact under mtx_in_: generation requests
    // submitted but not yet in a slot, slots without a request, embedding requests not yet run.
    int32_t                             n_unassigned_ = 0;
    int32_t                             n_idle_       = 0;
    int32_t                             n_emb_waiting_ = 0;

    // out: events, and a pipe that wakes the consumer once per step
    mutable std::mutex mtx_out_;
    std::vector<event> events_;
    std::vector<job_result> jobs_done_;
    bool               notified_ = false;
    int                pipe_rd_  = -1;
    int                pipe_wr_  = -1;

    std::string        lost_;  // failure(); set by the RPC loss watch, on ggml's thread

    std::unique_ptr<rpc_loss_watch> rpc_watch_;  // with --rpc, while started
    std::thread thread_;
    bool        started_ = false;
};

}  // namespace llamabox
