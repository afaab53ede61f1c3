#include "engine.h"
#include "backends.h"
#include "rpc.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <unordered_set>

#include "common.h"
#include "embedder.h"
#include "model.h"
#include "sampler.h"
#include "scheduler.h"
#include "slot.h"
#include "speculator.h"
#include "text.h"

namespace llamabox {

namespace {

// Requests are prepared on this many threads, at this nice value (Linux: per thread): a long
// tokenization then takes its time, not the decode threads' cores.
constexpr int PREPARE_THREADS = 2;
constexpr int PREPARE_NICE    = 10;

}  // namespace

prepared::prepared() = default;
prepared::~prepared() = default;
prepared::prepared(prepared &&) noexcept = default;
prepared & prepared::operator=(prepared &&) noexcept = default;

engine::engine(const engine_params & params) : params_(params), log_verbose_(params.verbose) {
    llama_backend_init();
    require_cpu_backend();
    if (params_.n_parallel < 1) throw load_error("n_parallel must be at least 1");
    if (params_.n_batch < 1 || params_.n_ubatch < 1) throw load_error("n_batch and n_ubatch must be positive");

    add_rpc_servers(params_.rpc_servers);
    model_params mp;
    mp.path          = params_.model_path;
    mp.n_gpu_layers  = params_.n_gpu_layers;
    mp.use_mmap      = params_.use_mmap;
    mp.use_mlock     = params_.use_mlock;
    mp.repack        = params_.repack;
    mp.chat_template = params_.chat_template;
    mp.progress      = params_.progress.get();
    model_ = std::make_unique<model>(mp);
    for (const auto & l : params_.loras) {
        log_capture capture;
        llama_adapter_lora_ptr a(llama_adapter_lora_init(model_->get(), l.path.c_str()));
        if (!a) {
            throw load_error("failed to load the LoRA adapter " + l.path +
                             (capture.errors().empty() ? std::string() : ": " + capture.errors()));
        }
        if (!std::isfinite(l.scale)) throw load_error("the LoRA adapter " + l.path + " has a scale that is not finite");
        loras_.push_back(std::move(a));
        lora_paths_.push_back(l.path);
        lora_scales_.push_back(params_.lora_init_without_apply ? 0.0f : l.scale);
    }

    auto cparams = llama_context_default_params();
    const int32_t n_threads = params_.n_threads > 0 ? params_.n_threads : common_cpu_get_num_math();
    const int32_t n_ubatch  = std::min(params_.n_ubatch, params_.n_batch);
    cparams.n_ctx           = params_.n_ctx > 0 ? (uint32_t) params_.n_ctx : 0;
    cparams.n_batch         = (uint32_t) params_.n_batch;
    cparams.n_ubatch        = (uint32_t) n_ubatch;
    cparams.n_seq_max       = (uint32_t) params_.n_parallel;
    cparams.n_threads       = n_threads;
    cparams.n_threads_batch = params_.n_threads_batch > 0 ? params_.n_threads_batch : n_threads;
    cparams.flash_attn_type = (llama_flash_attn_type) params_.flash_attn;
    cparams.type_k          = kv_cache_type(params_.cache_type_k);
    cparams.type_v          = kv_cache_type(params_.cache_type_v);
    cparams.kv_unified      = params_.kv_unified;
    cparams.swa_full        = params_.swa_full;
    cparams.no_perf         = true;
    // A step asks for logits of each slot's next token and its drafts, never of prompt tokens:
    // the output buffer and the logits part of the compute buffer are sized for that, not for a
    // whole ubatch of a 262k vocabulary.
    const auto & sp = params_.speculative;
    const bool speculate = !sp.draft_model.empty() ||
                           std::any_of(sp.types.begin(), sp.types.end(), [](const auto & n) { return n != "none"; });
    // Drafts share a budget per step (the largest one draft may take, or 64 when that is less):
    // with many slots the policy verifies little anyway, and the buffers stay small.
    n_draft_step_max_ = speculate ? std::max(std::max(0, sp.n_max), std::min(64, params_.n_parallel * sp.n_max)) : 0;
    cparams.n_outputs_max   = (uint32_t) std::min<int64_t>(params_.n_batch, (int64_t) params_.n_parallel + n_draft_step_max_);
    {
        log_capture capture;
        ctx_.reset(llama_init_from_model(model_->get(), cparams));
        if (!ctx_) {
            throw load_error("failed to create a context for " + params_.model_path +
                             (capture.errors().empty() ? std::string() : ": " + capture.errors()));
        }
    }
    if (!loras_.empty() && !apply_lora(lora_scales_)) throw load_error("failed to apply the LoRA adapters");
    if (!params_.media.path.empty()) {
        media_ = std::make_unique<media_projector>(params_.media, *model_, (int32_t) cparams.n_threads_batch);
    }
    if (params_.embeddings) {
        embedder_params ep;
        for (const auto & a : loras_) ep.loras.push_back(a.get());
        ep.lora_scales  = lora_scales_;
        ep.n_tokens_max = n_ubatch;
        ep.n_seq_max    = std::max(params_.n_parallel, 8);
        ep.pooling      = params_.pooling;
        ep.n_threads    = cparams.n_threads_batch;
        ep.flash_attn   = params_.flash_attn;
        emb_ = std::make_unique<embedder>(*model_, ep);
    }

    if (speculate) {
        spec_ = std::make_unique<speculator>(sp, *model_, params_.model_path, ctx_.get(), params_.kv_unified,
                                             (int32_t) cparams.n_threads, (int32_t) cparams.n_threads_batch);
        if (spec_->default_types() == 0) spec_.reset();  // "none" given
        const char * trace = std::getenv("LLAMABOX_SPEC_TRACE");
        trace_spec_ = trace != nullptr && trace[0] == '1';
    }

    info_.path = params_.model_path;
    model_->describe(info_);
    info_.n_ctx      = (int32_t) llama_n_ctx(ctx_.get());
    info_.n_ctx_slot = (int32_t) llama_n_ctx_seq(ctx_.get());
    info_.embeddings = emb_ != nullptr;
    info_.pooling    = emb_ ? emb_->pooling() : 0;
    info_.n_embd_tokens_max = emb_ ? emb_->n_tokens_max() : 0;
    info_.n_cls_out  = emb_ ? emb_->n_cls_out() : 0;
    info_.vision     = media_ && media_->vision();
    info_.audio      = media_ && media_->audio();

    workers_ = std::make_unique<worker_pool>(PREPARE_THREADS, PREPARE_NICE);
    batch_ = llama_batch_init(params_.n_batch + params_.n_parallel + n_draft_step_max_, 0, 1);
    if (spec_ && spec_->adaptive()) {
        const bool stream_per_seq = !params_.kv_unified && params_.n_parallel > 1;
        spec_->policy().set_layout(stream_per_seq, (int32_t) llama_n_ubatch(ctx_.get()), n_draft_step_max_);
        calibrate_pending_ = true;
    }
    for (int32_t i = 0; i < params_.n_parallel; ++i) {
        auto s = std::make_unique<slot>();
        s->id = i;
        slots_.push_back(std::move(s));
    }
    n_idle_ = params_.n_parallel;
    stats_.n_slots = params_.n_parallel;
    stats_.kv_cells_total = info_.n_ctx;
    stats_.slots.resize(params_.n_parallel);
    for (int32_t i = 0; i < params_.n_parallel; ++i) stats_.slots[i].id_slot = i;

    int fds[2];
    if (pipe(fds) != 0) throw load_error("cannot create the engine's notification pipe");
    pipe_rd_ = fds[0];
    pipe_wr_ = fds[1];
    for (int fd : fds) {
        const int flags = fcntl(fd, F_GETFL);
        if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0 || fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) {
            close(fds[0]);
            close(fds[1]);
            pipe_rd_ = pipe_wr_ = -1;
            throw load_error("cannot set up the engine's notification pipe");
        }
    }
}

engine::~engine() {
    stop();
    workers_.reset();
    rpc_watch_.reset();
    // A lost RPC server leaves the decode thread inside llama_decode for good, and freeing a
    // buffer on a server that is gone would abort (or wait forever): leave the model and the
    // contexts to the end of the process then. The pipe and the queues are ours alone.
    if (!failure().empty() || (!params_.rpc_servers.empty() && !rpc_servers_reachable(params_.rpc_servers, 1000))) {
        for (auto & s : slots_) (void) s.release();
        (void) spec_.release();
        (void) emb_.release();
        (void) media_.release();
        (void) ctx_.release();
        (void) model_.release();
    }
    llama_batch_free(batch_);
    slots_.clear();
    spec_.reset();
    pending_.clear();
    pending_emb_.clear();
    inbox_.clear();
    emb_.reset();
    ctx_.reset();
    media_.reset();
    model_.reset();
    if (pipe_rd_ >= 0) close(pipe_rd_);
    if (pipe_wr_ >= 0) close(pipe_wr_);
}

void engine::start() {
    if (started_) return;
    started_ = true;
    if (!params_.rpc_servers.empty()) {
        rpc_watch_ = std::make_unique<rpc_loss_watch>([this](const std::string & why) {
            std::string servers;
            for (const auto & ep : params_.rpc_servers) servers += (servers.empty() ? "" : ",") + ep;
            std::lock_guard<std::mutex> lk(mtx_out_);
            if (lost_.empty()) {
                lost_ = "the ggml RPC server (--rpc " + servers + ") went away or broke the protocol (" + why +
                        "); restart this server to generate again";
            }
            notify_locked();  // the consumer wakes, sees failure() and fails what is in flight
        });
    }
    thread_ = std::thread([this] { loop(); });
}

void engine::stop() {
    {
        std::lock_guard<std::mutex> lk(mtx_in_);
        if (stopping_ && !thread_.joinable()) return;
        stopping_ = true;
    }
    cv_in_.notify_all();
    if (!thread_.joinable()) return;
    if (!failure().empty()) {
        thread_.detach();  // stuck in a call to the lost RPC server: it never returns
        return;
    }
    thread_.join();
}

std::string engine::failure() const {
    std::lock_guard<std::mutex> lk(mtx_out_);
    return lost_;
}

// ---- decode thread ----

void engine::loop() {
    if (calibrate_pending_) {
        calibrate_pending_ = false;
        measure_step_costs();
    }
    while (true) {
        std::vector<std::unique_ptr<task>> incoming;
        std::vector<uint64_t> cancels;
        std::vector<slot_op> ops;
        {
            std::unique_lock<std::mutex> lk(mtx_in_);
            const bool busy = !pending_.empty() || !pending_emb_.empty() ||
                              std::any_of(slots_.begin(), slots_.end(), [](const auto & s) { return !s->is_idle(); });
            if (!busy) {
                cv_in_.wait(lk, [&] { return stopping_ || !inbox_.empty() || !cancels_.empty() || !slot_ops_.empty(); });
            }
            if (stopping_) break;
            incoming.swap(inbox_);
            cancels.swap(cancels_);
            ops.swap(slot_ops_);
        }
        // Slot operations first: a restore is in place before the requests that came with it
        // choose their slots.
        for (const auto & op : ops) {
            job_result r;
            r.id_job = op.id_job;
            try {
                run_slot_op(op, r);
            } catch (...) {
                r.error = std::current_exception();
            }
            std::lock_guard<std::mutex> lk(mtx_out_);
            jobs_done_.push_back(std::move(r));
            notify_locked();
        }
        try {
            intake(incoming, cancels);
            assign_slots();
            run_embeddings();
            run_generation();
        } catch (const std::exception & e) {
            // Last resort: whatever threw fails the requests in the slots, never the loop.
            std::fprintf(stderr, "llamabox: engine step failed: %s\n", e.what());
            for (auto & s : slots_) {
                if (!s->is_idle()) fail_slot(*s, std::string("engine step failed: ") + e.what());
            }
        }
        publish_stats();  // before the events, so whoever sees a final event sees its slot idle
        flush_events();
    }

    // Stopping: everything still in flight ends as cancelled.
    std::vector<std::unique_ptr<task>> rest;
    {
        std::lock_guard<std::mutex> lk(mtx_in_);
        rest.swap(inbox_);
    }
    for (auto & t : rest) pending_.push_back(std::move(t));
    for (auto & t : pending_emb_) pending_.push_back(std::move(t));
    pending_emb_.clear();
    for (auto & t : pending_) {
        event ev;
        ev.id_req = t->req.id_req;
        ev.finish = FINISH_REASON_CANCELLED;
        out_.push_back(std::move(ev));
    }
    pending_.clear();
    for (auto & s : slots_) {
        if (!s->is_idle()) finish(*s, FINISH_REASON_CANCELLED);
    }
    publish_stats();
    flush_events();
}

void engine::intake(std::vector<std::unique_ptr<task>> & incoming, std::vector<uint64_t> & cancels) {
    for (auto & t : incoming) {
        t->t_arrival = ++clock_;
        (t->req.kind == REQUEST_KIND_EMBEDDING ? pending_emb_ : pending_).push_back(std::move(t));
    }
    if (!incoming.empty()) {
        std::lock_guard<std::mutex> lk(mtx_stats_);
        stats_.n_requests_total += (int64_t) incoming.size();
    }
    if (cancels.empty()) return;
    const std::unordered_set<uint64_t> ids(cancels.begin(), cancels.end());
    for (auto * queue : {&pending_, &pending_emb_}) {
        for (auto it = queue->begin(); it != queue->end();) {
            if (!ids.count((*it)->req.id_req)) {
                ++it;
                continue;
            }
            event ev;
            ev.id_req = (*it)->req.id_req;
            ev.finish = FINISH_REASON_CANCELLED;
            ev.n_prompt = (int32_t) (*it)->req.prompt.size();
            out_.push_back(std::move(ev));
            it = queue->erase(it);
            std::lock_guard<std::mutex> lk(mtx_in_);
            (queue == &pending_ ? n_unassigned_ : n_emb_waiting_)--;
        }
    }
    for (auto & s : slots_) {
        if (!s->is_idle() && ids.count(s->t->req.id_req)) finish(*s, FINISH_REASON_CANCELLED);
    }
}

void engine::run_slot_op(const slot_op & op, job_result & r) {
    if (op.id_slot < 0 || op.id_slot >= (int32_t) slots_.size()) {
        throw invalid_request("no slot " + std::to_string(op.id_slot) + ": this server has " +
                              std::to_string(slots_.size()) + " (0.." + std::to_string(slots_.size() - 1) + ")");
    }
    slot & s = *slots_[(size_t) op.id_slot];
    if (!s.is_idle()) throw invalid_request("slot " + std::to_string(op.id_slot) + " is busy with a request");
    const auto t0 = std::chrono::steady_clock::now();
    auto ms = [&] {
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    };
    char buf[160];
    switch (op.action) {
        case slot_action::save: {
            if (!s.spans.empty()) {
                // The file keeps tokens and KV, not where the positions skip.
                throw invalid_request("slot " + std::to_string(s.id) +
                                      " holds an image with M-RoPE positions, which a slot file cannot record");
            }
            const size_t n = llama_state_seq_save_file(ctx_.get(), op.path.c_str(), s.id, s.cache.data(), s.cache.size());
            if (n == 0) throw invalid_request("cannot save slot " + std::to_string(s.id) + " to " + op.path);
            std::snprintf(buf, sizeof buf, "{\"n_saved\": %zu, \"n_written\": %zu, \"ms\": %.3f}", s.cache.size(), n, ms());
            break;
        }
        case slot_action::restore: {
            std::vector<llama_token> tokens((size_t) llama_n_ctx_seq(ctx_.get()));
            size_t n_tokens = 0;
            forget_from(s, 0);  // a failed load must not leave a half-written sequence behind
            const size_t n = llama_state_seq_load_file(ctx_.get(), op.path.c_str(), s.id, tokens.data(), tokens.size(), &n_tokens);
            if (n == 0) {
                llama_memory_seq_rm(llama_get_memory(ctx_.get()), s.id, -1, -1);
                throw invalid_request("cannot restore slot " + std::to_string(s.id) + " from " + op.path +
                                      ": not a saved slot of this model, or longer than the slot's context");
            }
            tokens.resize(n_tokens);
            s.cache = std::move(tokens);
            s.n_draft_synced = 0;  // the draft model's KV starts over (forget_from dropped it)
            s.t_last_used = ++clock_;
            {
                // A slot file holds no adapter scales: it counts as saved under the server's.
                std::lock_guard<std::mutex> lk(mtx_lora_);
                s.cache_lora = lora_scales_;
            }
            std::snprintf(buf, sizeof buf, "{\"n_restored\": %zu, \"n_read\": %zu, \"ms\": %.3f}", n_tokens, n, ms());
            break;
        }
        case slot_action::erase: {
            const size_t n = s.cache.size();
            forget_from(s, 0);
            std::snprintf(buf, sizeof buf, "{\"n_erased\": %zu}", n);
            break;
        }
    }
    r.text = buf;
}

bool engine::forget_from(slot & s, size_t n) {
    n = std::min(s.keep_point(n), s.cache.size());
    if (spec_ && s.n_draft_synced > (int32_t) n) {  // the draft model's KV: text only, positions = indices
        s.n_draft_synced = spec_->forget_from(s.id, (llama_pos) n) ? (int32_t) n : 0;
    }
    llama_memory_t mem = llama_get_memory(ctx_.get());
    if (llama_memory_seq_rm(mem, s.id, s.pos_at(n), -1)) {
        s.cache.resize(n);
        while (!s.spans.empty() && s.spans.back().begin >= n) s.spans.pop_back();
        return true;
    }
    // The memory cannot drop just the tail (a recurrent or sliding-window cache that lost the
    // positions): drop the whole sequence, so the bookkeeping never claims KV that is not there.
    llama_memory_seq_rm(mem, s.id, -1, -1);
    s.cache.clear();
    s.spans.clear();
    return false;
}

void engine::assign_slots() {
    llama_memory_t mem = llama_get_memory(ctx_.get());
    static const std::vector<llama_token> nothing;
    while (!pending_.empty()) {
        auto & t = pending_.front();
        // A prefix cached under other LoRA scales holds other KV values: it is no prefix.
        std::vector<idle_slot_view> idle;
        for (const auto & s : slots_) {
            if (s->is_idle()) idle.push_back({s->id, s->cache_lora == t->lora ? &s->cache : &nothing, s->t_last_used});
        }
        if (idle.empty()) break;
        const bool reuse = t->req.cache_prompt;
        const int32_t id = choose_slot(idle, reuse ? t->req.prompt : std::vector<llama_token>{});
        slot & s = *slots_[id];

        // Keep the shared prefix, up to the prompt's last token (decoded on its own, see task).
        size_t n_keep = reuse && s.cache_lora == t->lora ? std::min(common_prefix(s.cache, t->req.prompt), t->n_prefill()) : 0;
        // On sliding-window layers the positions before the window may be gone: reuse only if
        // everything the next token attends to is still there.
        if (n_keep > 0 && info_.n_swa > 0) {
            const llama_pos pos_min = llama_memory_seq_pos_min(mem, s.id);
            if (pos_min > std::max<llama_pos>(0, s.pos_at(n_keep) - info_.n_swa)) n_keep = 0;
        }
        // A non-causal media input's rows attend to each other: a part of one is no prefix (nor
        // of an M-RoPE image, whose rows the KV can drop only whole: forget_from).
        if (const media_chunk * c = t->media_at(n_keep); c != nullptr && c->non_causal) n_keep = c->pos;
        forget_from(s, n_keep);
        n_keep = s.cache.size();  // less where a span was cut, none if the memory dropped all
        s.cache_lora = t->lora;
        t->n_cached = (int32_t) n_keep;
        {
            std::lock_guard<std::mutex> lk(mtx_in_);
            n_unassigned_--;
            n_idle_--;
        }
        t->t_start_us = now_us();  // prompt time counts from here, not from arrival in the queue
        s.t = std::move(t);
        pending_.pop_front();
        s.t->ev.id_req = s.t->req.id_req;
        if (n_keep == s.t->n_prefill()) prefill_done(s);
    }
}

void engine::run_embeddings() {
    // One batch of waiting inputs, as many as fit, in the embedding context.
    if (pending_emb_.empty()) return;
    std::vector<std::unique_ptr<task>> todo;
    std::vector<const std::vector<llama_token> *> inputs;
    int32_t n_tokens = 0;
    while (!pending_emb_.empty() && (int32_t) todo.size() < emb_->n_seq_max()) {
        const int32_t n = (int32_t) pending_emb_.front()->req.prompt.size();
        if (!todo.empty() && n_tokens + n > emb_->n_tokens_max()) break;
        n_tokens += n;
        todo.push_back(std::move(pending_emb_.front()));
        pending_emb_.pop_front();
        inputs.push_back(&todo.back()->req.prompt);
    }
    {
        std::lock_guard<std::mutex> lk(mtx_in_);
        n_emb_waiting_ -= (int32_t) todo.size();
    }
    const int64_t t0 = now_us();
    auto results = emb_->run(inputs);
    const double ms = (now_us() - t0) / 1000.0;
    {
        std::lock_guard<std::mutex> lk(mtx_stats_);
        stats_.n_decode_total++;
        stats_.n_prompt_tokens_total += n_tokens;
        stats_.t_prompt_ms_total += ms;
    }
    for (size_t i = 0; i < todo.size(); ++i) {
        event ev;
        ev.id_req = todo[i]->req.id_req;
        ev.n_prompt = (int32_t) todo[i]->req.prompt.size();
        ev.t_prompt_ms = ms;
        if (results[i].error.empty()) {
            ev.finish = FINISH_REASON_STOP;
            ev.embedding = std::move(results[i].embedding);
            ev.n_rows = results[i].n_rows;
        } else {
            ev.finish = FINISH_REASON_ERROR;
            ev.error = results[i].error;
        }
        out_.push_back(std::move(ev));
    }
}

void engine::fail_slot(slot & s, const std::string & error) {
    llama_memory_seq_rm(llama_get_memory(ctx_.get()), s.id, -1, -1);  // a whole sequence always goes
    s.cache.clear();
    s.spans.clear();
    if (spec_) spec_->forget_from(s.id, 0);
    s.n_draft_synced = 0;
    if (!s.is_idle()) finish(s, FINISH_REASON_ERROR, error);
}

void engine::finish(slot & s, finish_reason reason, const std::string & error) {
    task & t = *s.t;
    event & ev = t.ev;
    if (reason == FINISH_REASON_STOP || reason == FINISH_REASON_LENGTH) {
        if (ev.stop_word.empty()) {
            // Release held-back text: no stop string completed. A truncated UTF-8 tail is
            // replaced, never split.
            const auto r = t.stops.push(t.utf8.flush());
            ev.text += r.text;
            if (r.stopped) {
                ev.stop_word = r.stop_word;
                reason = FINISH_REASON_STOP;
            } else {
                ev.text += t.stops.flush();
            }
        }
    }
    const int64_t t_end = now_us();
    ev.finish = reason;
    ev.error = error;
    ev.n_prompt = (int32_t) t.req.prompt.size();
    ev.n_cached = t.n_cached;
    ev.n_decoded = t.n_decoded;
    ev.n_drafted = t.n_drafted;
    ev.n_accepted = t.n_accepted;
    if (t.t_first_us > 0) {
        ev.t_prompt_ms = (t.t_first_us - t.t_start_us) / 1000.0;
        ev.t_gen_ms = (t_end - t.t_first_us) / 1000.0;
    } else {
        ev.t_prompt_ms = (t_end - t.t_start_us) / 1000.0;
    }
    {
        std::lock_guard<std::mutex> lk(mtx_stats_);
        stats_.n_prompt_tokens_total += ev.n_prompt - ev.n_cached;
        stats_.t_prompt_ms_total += ev.t_prompt_ms;
        stats_.n_tokens_predicted_total += ev.n_decoded;
        stats_.t_predicted_ms_total += ev.t_gen_ms;
        stats_.n_tokens_drafted_total += ev.n_drafted;
        stats_.n_tokens_drafted_accepted_total += ev.n_accepted;
    }
    out_.push_back(std::move(ev));
    s.t.reset();
    s.t_last_used = ++clock_;
    std::lock_guard<std::mutex> lk(mtx_in_);
    n_idle_++;
}

void engine::flush_events() {
    // Each busy slot's output of this step becomes one event; finished ones were emitted already.
    for (auto & s : slots_) {
        if (s->is_idle()) continue;
        event & ev = s->t->ev;
        if (ev.tokens.empty() && ev.text.empty() && ev.logprobs.empty()) continue;
        out_.push_back(std::move(ev));
        ev = event();
        ev.id_req = s->t->req.id_req;
    }
    if (out_.empty()) return;
    std::lock_guard<std::mutex> lk(mtx_out_);
    if (events_.empty()) {
        events_.swap(out_);
    } else {
        std::move(out_.begin(), out_.end(), std::back_inserter(events_));
        out_.clear();
    }
    notify_locked();
}

void engine::notify_locked() {
    if (notified_) return;
    notified_ = true;
    const char one = 1;
    if (write(pipe_wr_, &one, 1) < 0) { /* pipe full: a wake-up is already pending */ }
}

void engine::publish_stats() {
    std::lock_guard<std::mutex> lk(mtx_stats_);
    int32_t n_busy = 0;
    int64_t n_cells = 0;
    for (const auto & s : slots_) {
        slot_info & si = stats_.slots[s->id];
        si.state = s->is_idle() ? 0 : 1;
        si.n_cached = (int32_t) s->cache.size();
        si.n_prompt = s->t ? (int32_t) s->t->req.prompt.size() : 0;
        si.n_decoded = s->t ? s->t->n_decoded : 0;
        si.n_drafted = s->t ? s->t->n_drafted : 0;
        si.n_accepted = s->t ? s->t->n_accepted : 0;
        si.draft_acceptance = s->t && s->t->spec.types ? (float) s->t->spec.acceptance : 0.0f;
        si.tag = s->t ? s->t->req.tag : std::string();
        n_busy += s->is_idle() ? 0 : 1;
        n_cells += (int64_t) s->cache.size();
    }
    stats_.n_busy = n_busy;
    stats_.n_queued = (int32_t) (pending_.size() + pending_emb_.size());
    stats_.kv_cells_used = n_cells;
}

}  // namespace llamabox
