// One engine step for the generation context:
//
//   draft    each generating slot may get draft tokens (n-gram lookup, then the draft model),
//            as many as pay for themselves in this step (draft_policy)
//   plan     every generating slot's next token and drafts first, then chunks of prompts
//   decode   one llama_decode; on failure, make room and retry at the least cost
//   verify   sample each output in turn; a draft token equal to what was sampled is accepted,
//            the first one that is not ends the run; rejected tokens leave the KV cache
//   commit   per committed token: logprobs, end-of-generation, stop strings, max_tokens
#include <algorithm>
#include <chrono>
#include <cstdio>

#include "common.h"
#include "engine.h"
#include "model.h"
#include "sampler.h"
#include "scheduler.h"
#include "slot.h"
#include "speculator.h"

namespace llamabox {

namespace {

void batch_add(llama_batch & b, llama_token tok, llama_pos pos, llama_seq_id seq, bool logits) {
    const int32_t i = b.n_tokens++;
    b.token[i]     = tok;
    b.pos[i]       = pos;
    b.n_seq_id[i]  = 1;
    b.seq_id[i][0] = seq;
    b.logits[i]    = logits;
}

std::string decode_error(int32_t ret) {
    if (ret == 1) return "llama_decode found no room in the KV cache for this request (code 1)";
    return "llama_decode failed for this request (code " + std::to_string(ret) + ")";
}

}  // namespace

void engine::pick_step_lora() {
    if (loras_.empty()) return;  // step_lora_ stays empty, as every task's
    const slot * oldest = nullptr;
    for (const auto & s : slots_) {
        if (s->is_idle()) continue;
        if (oldest == nullptr || s->t_last_step < oldest->t_last_step ||
            (s->t_last_step == oldest->t_last_step && s->t->t_arrival < oldest->t->t_arrival)) {
            oldest = s.get();
        }
    }
    if (oldest != nullptr) step_lora_ = oldest->t->lora;
}

bool engine::in_step(const slot & s) const { return !s.is_idle() && s.t->lora == step_lora_; }

bool engine::apply_lora(const std::vector<float> & scales) {
    if (scales == lora_applied_ && !lora_applied_.empty()) return true;
    std::vector<llama_adapter_lora *> ptrs;
    for (const auto & a : loras_) ptrs.push_back(a.get());
    std::vector<float> s = scales;
    if (llama_set_adapters_lora(ctx_.get(), ptrs.data(), ptrs.size(), s.data()) != 0) return false;
    lora_applied_ = scales;
    return true;
}

void engine::plan_drafts() {
    for (auto & s : slots_) {
        if (s->is_idle()) continue;
        s->t->spec.draft.clear();
        s->t->spec.type_last = -1;
        s->t->spec.n_tail = 0;
        s->t->spec.n_offered = 0;
    }
    if (!spec_) return;

    std::vector<speculator::draft_job> jobs;
    std::vector<slot *> owners;
    int32_t n_gen = 0, n_prefill = 0;
    for (auto & sp : slots_) {
        slot & s = *sp;
        if (!in_step(s)) continue;
        task & t = *s.t;
        if (!t.generating) {
            n_prefill += (int32_t) (t.n_prefill() - s.cache.size());
            continue;
        }
        n_gen++;
        if (t.spec.types == 0 || t.spec.n_max <= 0) continue;
        // k drafts verified give up to k + 1 tokens: stay inside max_tokens and the context.
        int32_t k_max = std::min(t.spec.n_max, info_.n_ctx_slot - (int32_t) s.cache.size() - 2);
        if (t.req.n_predict >= 0) k_max = std::min(k_max, t.req.n_predict - t.n_decoded - 1);
        if (k_max <= 0) continue;
        speculator::draft_job j;
        j.seq       = s.id;
        j.types     = t.spec.types;
        j.n_max     = k_max;
        j.n_min     = t.spec.n_min;
        j.p_min     = t.spec.p_min;
        j.id_last   = t.next_token;
        j.history   = &s.cache;
        j.result    = &t.spec.draft;
        j.type_used = &t.spec.type_last;
        j.n_synced  = &s.n_draft_synced;
        j.n_tail    = &t.spec.n_tail;
        jobs.push_back(j);
        owners.push_back(&s);
    }
    if (jobs.empty()) return;
    spec_->draft(jobs, false);  // n-gram lookups: cheap, and they say how much is on offer

    // How much of each draft (or of a draft model's) is worth verifying in this step.
    const bool model_ok = spec_->has_draft_model();
    std::vector<draft_policy::slot_in> in(jobs.size());
    for (size_t i = 0; i < jobs.size(); ++i) {
        const task & t = *owners[i]->t;
        const bool by_model = t.spec.draft.empty() && model_ok && (t.spec.types & SPEC_DRAFT_BIT);
        in[i].n_avail    = by_model ? jobs[i].n_max : (int32_t) t.spec.draft.size();
        in[i].acceptance = t.spec.acceptance;
        in[i].model      = by_model;
        in[i].seq        = owners[i]->id;
        in[i].n_room     = jobs[i].n_max;
    }
    std::vector<int32_t> gen_seqs;
    for (const auto & sp : slots_) {
        if (!sp->is_idle() && sp->t->generating) gen_seqs.push_back(sp->id);
    }
    const int32_t n_prefill_step = std::min({n_prefill, params_.n_ubatch, params_.n_batch});
    std::vector<int32_t> k(jobs.size());
    if (spec_->adaptive()) {
        k = spec_->policy().allocate(in, n_gen, n_prefill_step, gen_seqs);
    } else {
        for (size_t i = 0; i < jobs.size(); ++i) k[i] = in[i].n_avail;
    }
    // The batch holds every generating slot's token and the drafts, within the step's draft
    // budget (the output buffers' size): trim the longest drafts until they fit.
    int32_t total = 0;
    for (int32_t v : k) total += v;
    const int32_t budget = std::min(n_draft_step_max_, params_.n_batch - n_gen);
    while (total > budget) {
        auto it = std::max_element(k.begin(), k.end());
        if (*it == 0) break;
        (*it)--;
        total--;
    }
    if (trace_spec_) {
        const auto & pol = spec_->policy();
        std::fprintf(stderr, "spec: a=%.2f b=%.3f d=%.2f gen=%d pre=%d plain=%.3f spec=%.3f tok/ms |", pol.cost_fixed_ms(),
                     pol.cost_per_token_ms(), pol.draft_step_ms(), n_gen, n_prefill_step, pol.rate_plain(n_gen),
                     pol.rate_spec(n_gen));
        for (size_t i = 0; i < jobs.size(); ++i) std::fprintf(stderr, " %d/%d@%.2f", k[i], in[i].n_avail, in[i].acceptance);
        std::fprintf(stderr, " | ms:");
        for (int32_t n : {1, 2, 4, 8, 16, 32, 48, 65}) std::fprintf(stderr, " %d=%.0f", n, pol.step_ms(n));
        std::fprintf(stderr, "\n");
    }
    std::vector<speculator::draft_job> model_jobs;
    for (size_t i = 0; i < jobs.size(); ++i) {
        task & t = *owners[i]->t;
        int32_t real = std::min(k[i], in[i].n_avail);
        if (real < std::max(1, t.spec.n_min)) real = 0;
        if (k[i] == 0 || (real == 0 && !spec_->policy().pads())) k[i] = 0;
        if (in[i].model) {
            if (real > 0) {
                model_jobs.push_back(jobs[i]);
                model_jobs.back().n_max = real;
            }
        } else {
            t.spec.n_offered = (int32_t) t.spec.draft.size();
            if (real > 0) {
                t.spec.shadow.clear();  // the verification counts; a shadow would count again
            } else if (t.spec.shadow.empty() && !t.spec.draft.empty()) {
                t.spec.shadow = t.spec.draft;
                t.spec.shadow_pos = 0;
            }
            t.spec.draft.resize((size_t) real);
        }
    }
    if (!model_jobs.empty()) spec_->draft(model_jobs, true);
    // The same depth for every slot: shorter drafts padded (any token: a padding token the
    // model happens to predict is accepted like a drafted one).
    for (size_t i = 0; i < jobs.size(); ++i) {
        task & t = *owners[i]->t;
        t.spec.n_real = (int32_t) t.spec.draft.size();  // what the drafter really made; the rest pads
        while ((int32_t) t.spec.draft.size() < k[i]) t.spec.draft.push_back(t.next_token);
    }
}

void engine::measure_step_costs() {
    // The draft policy needs the cost of a step of n tokens for n up to a slot's longest draft
    // and up to every slot with drafts. On a CPU that curve is far from a line (ggml changes
    // kernels with the batch: two rows can cost 2.5 one-row steps and 64 rows only 26), and
    // learning it online would take many steps of guessing wrong: the sizes that matter are
    // decoded once each at start (a dummy sequence, removed after), within about 3 s. Steps
    // then keep the curve current.
    const int32_t n_rows_max = std::min({params_.n_batch, params_.n_parallel + n_draft_step_max_, info_.n_ctx_slot - 1});
    if (n_rows_max < 2) return;
    const int32_t np = params_.n_parallel, nd = spec_->n_max();
    std::vector<int32_t> sizes = {1, 1 + nd, np, np + n_draft_step_max_, 2, 4, 8, 16, 32, np + 4, np + 16};
    for (auto & n : sizes) n = std::clamp(n, 1, n_rows_max);
    llama_token tok = llama_vocab_bos(model_->vocab());
    if (tok == LLAMA_TOKEN_NULL) tok = 0;
    llama_memory_t mem = llama_get_memory(ctx_.get());
    const auto run = [&](int32_t n) {
        batch_.n_tokens = 0;
        for (int32_t i = 0; i < n; ++i) batch_add(batch_, tok, i, 0, true);
        const int64_t t0 = now_us();
        const int32_t ret = llama_decode(ctx_.get(), batch_);
        const double ms = (now_us() - t0) / 1000.0;
        if (!llama_memory_seq_rm(mem, 0, -1, -1)) llama_memory_clear(mem, true);
        return ret == 0 ? ms : -1.0;
    };
    const int64_t t_start = now_us();
    if (run(n_rows_max) < 0) return;  // the first decode pays one-time costs; a failure: learnt online
    std::vector<int32_t> done;
    for (int32_t n : sizes) {
        if (std::find(done.begin(), done.end(), n) != done.end()) continue;
        if (now_us() - t_start > 3'000'000) break;
        const double ms = run(n);
        if (ms < 0) break;
        spec_->policy().observe_decode(n, ms);
        done.push_back(n);
    }
    std::fprintf(stderr, "llamabox: draft policy: %zu step sizes (1..%d tokens) measured in %.1f s\n", done.size(),
                 n_rows_max, (now_us() - t_start) / 1e6);
}

engine::decode_result engine::decode_step(int32_t n_prefill_max, bool with_drafts) {
    // Builds the step's batch from the plan and decodes it. If llama_decode fails, the KV memory
    // of every slot in the batch is rolled back to its committed tokens.
    std::vector<slot_view> views;
    int32_t n_gen = 0;
    for (const auto & s : slots_) {
        s->n_step = 0;
        s->i_out = -1;
        if (!in_step(*s)) continue;
        if (!with_drafts) s->t->spec.draft.clear();
        slot_view v;
        v.id_slot = s->id;
        v.generating = s->t->generating;
        v.n_prompt_left = s->t->generating ? 0 : s->t->text_run(s->cache.size());
        v.n_draft = (int32_t) s->t->spec.draft.size();
        v.t_arrival = s->t->t_arrival;
        n_gen += v.generating ? 1 + v.n_draft : 0;
        views.push_back(v);
    }
    const int32_t n_prefill_busy = std::min({params_.n_ubatch, params_.n_batch, n_prefill_max});
    const auto plan = plan_step(views, std::min(params_.n_batch, n_gen + n_prefill_max), n_prefill_busy);

    decode_result res;
    batch_.n_tokens = 0;
    for (const auto & e : plan) {
        slot & s = *slots_[e.id_slot];
        task & t = *s.t;
        s.n_step = e.n_tokens;
        s.t_last_step = clock_;
        const llama_pos pos = s.pos_next();
        if (t.generating) {
            res.n_gen++;
            res.n_drafted += (int32_t) t.spec.draft.size();
            s.i_out = batch_.n_tokens;
            batch_add(batch_, t.next_token, pos, s.id, true);
            for (size_t j = 0; j < t.spec.draft.size(); ++j) {
                batch_add(batch_, t.spec.draft[j], pos + 1 + (llama_pos) j, s.id, true);
            }
        } else {
            res.n_prefill += e.n_tokens;
            const size_t from = s.cache.size();
            for (int32_t i = 0; i < e.n_tokens; ++i) {
                batch_add(batch_, t.req.prompt[from + (size_t) i], pos + i, s.id, false);
            }
        }
    }
    res.n_tokens = batch_.n_tokens;
    if (batch_.n_tokens == 0) return res;
    if (spec_) {
        std::vector<int32_t> seqs, lens;
        for (const auto & e : plan) {
            if (!slots_[e.id_slot]->t->generating) continue;
            seqs.push_back(e.id_slot);
            lens.push_back(e.n_tokens);
        }
        res.n_ubatches = (int32_t) spec_->policy().split(seqs, lens, res.n_prefill).size();
    }

    if (!loras_.empty() && !apply_lora(step_lora_)) {
        // Nothing was decoded: the batch's slots fail like a failed decode (their KV is intact).
        res.ret = -1;
        res.ok = false;
        return res;
    }
    res.ret = llama_decode(ctx_.get(), batch_);
    {
        std::lock_guard<std::mutex> lk(mtx_stats_);
        stats_.n_decode_total++;
        stats_.n_decode_failed_total += res.ret != 0 ? 1 : 0;
    }
    if (res.ret == 0) return res;
    res.ok = false;
    std::fprintf(stderr, "llamabox: llama_decode failed (%d) on a batch of %d tokens (%d of prompts)\n", res.ret,
                 batch_.n_tokens, res.n_prefill);
    for (const auto & e : plan) {
        slot & s = *slots_[e.id_slot];
        if (!forget_from(s, s.cache.size())) fail_slot(s, "the KV cache could not be rolled back");
    }
    return res;
}

void engine::run_generation() {
    if (std::all_of(slots_.begin(), slots_.end(), [](const auto & s) { return s->is_idle(); })) return;
    const int64_t t_step = now_us();
    clock_++;
    pick_step_lora();
    run_media();
    plan_drafts();
    const int64_t t_decode = now_us();

    // A decode that finds no room in the KV cache (a shared one is full) is retried after
    // making room at the least cost: drafts first; idle slots' cached prefixes next, least
    // recently used first; then with less prefill in the batch, down to none, so the generating
    // slots keep going whatever a prompt does (a prompt that cannot be decoded even one token
    // at a time fails); then by ending the fewest requests: prompts not yet generating first
    // (they fail), then the youngest generating request (it ends with "length", its text so
    // far intact).
    decode_result res = decode_step(params_.n_batch, true);
    const bool first_try = res.ok;
    if (!res.ok && res.ret == 1) res = decode_step(params_.n_batch, false);
    while (!res.ok && res.ret == 1 && evict_idle_cache()) res = decode_step(params_.n_batch, false);

    std::vector<int32_t> blocked;  // slots whose prefill was in a failed batch
    int32_t n_prefill_max = res.n_prefill;
    while (!res.ok && n_prefill_max > 0) {
        for (const auto & s : slots_) {
            if (s->n_step > 0 && !s->is_idle() && !s->t->generating) blocked.push_back(s->id);
        }
        n_prefill_max /= 2;
        res = decode_step(n_prefill_max, false);
    }
    while (!res.ok && res.ret == 1) {
        slot * victim = nullptr;
        const auto rank = [](const slot & v) { return v.t->generating ? 1 : 0; };
        for (auto & s : slots_) {
            if (!in_step(*s) || (s->t->generating ? s->n_step == 0 : s->cache.empty())) continue;
            if (victim == nullptr || rank(*s) < rank(*victim) ||
                (rank(*s) == rank(*victim) && s->t->t_arrival > victim->t->t_arrival)) {
                victim = s.get();
            }
        }
        if (victim == nullptr) break;
        if (victim->t->generating) {
            forget_from(*victim, 0);
            finish(*victim, FINISH_REASON_LENGTH);
        } else {
            fail_slot(*victim, decode_error(1));
        }
        res = decode_step(0, false);
    }
    if (!res.ok) {
        const std::string why = decode_error(res.ret);
        for (auto & s : slots_) {
            if (s->n_step > 0 && !s->is_idle()) fail_slot(*s, why);
        }
        return;
    }
    if (n_prefill_max == 0 && res.n_prefill == 0) {
        // Prefill was shed to nothing before a batch went through: those prompts found no room.
        for (int32_t id : blocked) {
            slot & s = *slots_[id];
            if (!s.is_idle() && s.n_step == 0 && !s.t->generating) fail_slot(s, decode_error(1));
        }
    }
    n_committed_step_ = 0;
    const int64_t t_verify = now_us();
    for (auto & s : slots_) {
        if (s->n_step > 0 && !s->is_idle()) commit_slot(*s, s->n_step);
    }
    if (spec_ && first_try && res.n_prefill == 0) {
        // What the policy learns from: the cost of decoding and verifying this many tokens,
        // and what the whole step (drafting included) gave.
        const int64_t t_end = now_us();
        if (trace_spec_) {
            std::fprintf(stderr, "step: %d tokens in %d ubatches, draft %.1f ms, decode %.1f ms, verify %.1f ms, %d committed\n",
                         res.n_tokens, res.n_ubatches, (t_decode - t_step) / 1000.0, (t_verify - t_decode) / 1000.0,
                         (t_end - t_verify) / 1000.0, n_committed_step_);
        }
        // A step cut into several ubatches is several steps: its time says nothing of one size.
        if (res.n_ubatches == 1) spec_->policy().observe_decode(res.n_tokens, (t_end - t_decode) / 1000.0);
        spec_->policy().observe_step(res.n_gen, res.n_drafted, n_committed_step_, (t_end - t_step) / 1000.0,
                                     (t_decode - t_step) / 1000.0);
    }
}

void engine::run_media() {
    if (!media_) return;
    slot * pick = nullptr;
    const media_chunk * mc = nullptr;
    for (auto & sp : slots_) {
        slot & s = *sp;
        if (!in_step(s) || s.t->generating) continue;
        const media_chunk * c = s.t->media_at(s.cache.size());
        if (c != nullptr && (pick == nullptr || s.t->t_arrival < pick->t->t_arrival)) {
            pick = &s;
            mc = c;
        }
    }
    if (pick == nullptr) return;
    slot & s = *pick;
    task & t = *s.t;
    // Rows already in the KV: a causal input whose decode was cut short (a cancelled request's
    // cached prefix) goes on where it stopped. A non-causal one is decoded whole, in one ubatch.
    const int32_t from = (int32_t) (s.cache.size() - mc->pos);
    const int32_t n_ub = std::min(params_.n_ubatch, params_.n_batch);
    const int32_t n = mc->non_causal ? mc->n_tokens - from : std::min(mc->n_tokens - from, n_ub);
    const int32_t n_embd = llama_model_n_embd_inp(model_->get());
    if ((int64_t) mc->embd->size() < (int64_t) (from + n) * n_embd) {
        fail_slot(s, "the media input's embeddings are short of its rows");
        return;
    }
    const llama_pos pos0 = s.pos_at(mc->pos);  // the input's first position
    const int32_t n_pos_row = mc->mrope ? 4 : 1;  // M-RoPE: four components per row, section-major
    std::vector<llama_pos> pos((size_t) n * n_pos_row);
    if (mc->mrope) {
        for (int32_t i = 0; i < n; ++i) {
            for (int32_t j = 0; j < 4; ++j) {
                const llama_pos p = (*mc->mrope)[(size_t) (from + i) * 4 + j];
                pos[(size_t) j * n + i] = (mc->mrope_shift >> j & 1) ? pos0 + p : p;
            }
        }
    } else {
        for (int32_t i = 0; i < n; ++i) pos[(size_t) i] = pos0 + from + i;
    }
    std::vector<int32_t> n_seq_id((size_t) n, 1);
    llama_seq_id seq = s.id;
    std::vector<llama_seq_id *> seq_ids((size_t) n, &seq);
    std::vector<int8_t> logits((size_t) n, 0);
    llama_batch b = {};
    b.embd     = const_cast<float *>(mc->embd->data() + (size_t) from * n_embd);  // read only
    b.pos      = pos.data();
    b.n_seq_id = n_seq_id.data();
    b.seq_id   = seq_ids.data();
    b.logits   = logits.data();
    b.n_tokens = n;
    if (!loras_.empty() && !apply_lora(step_lora_)) {
        fail_slot(s, "the LoRA adapters could not be applied");
        return;
    }
    if (mc->non_causal) llama_set_causal_attn(ctx_.get(), false);
    int32_t ret = llama_decode(ctx_.get(), b);
    int32_t n_failed = ret != 0 ? 1 : 0;
    while (ret == 1 && evict_idle_cache()) {
        ret = llama_decode(ctx_.get(), b);
        n_failed += ret != 0 ? 1 : 0;
    }
    if (mc->non_causal) llama_set_causal_attn(ctx_.get(), true);
    {
        std::lock_guard<std::mutex> lk(mtx_stats_);
        stats_.n_decode_total += 1 + n_failed - (ret != 0 ? 1 : 0);
        stats_.n_decode_failed_total += n_failed;
        stats_.n_media_decodes_total++;
    }
    if (ret != 0) {
        std::fprintf(stderr, "llamabox: llama_decode failed (%d) on %d media rows\n", ret, n);
        fail_slot(s, decode_error(ret));
        return;
    }
    s.t_last_step = clock_;
    if (from == 0 && mc->n_pos != mc->n_tokens) s.spans.push_back({mc->pos, mc->n_tokens, mc->n_pos});
    const auto first = t.req.prompt.begin() + (std::ptrdiff_t) s.cache.size();
    s.cache.insert(s.cache.end(), first, first + n);
    if (s.cache.size() == t.n_prefill()) prefill_done(s);
}

bool engine::evict_idle_cache() {
    slot * lru = nullptr;
    for (auto & s : slots_) {
        if (s->is_idle() && !s->cache.empty() && (lru == nullptr || s->t_last_used < lru->t_last_used)) lru = s.get();
    }
    if (lru == nullptr) return false;
    forget_from(*lru, 0);
    return true;
}

void engine::commit_slot(slot & s, int32_t n_added) {
    task & t = *s.t;
    if (t.generating) {
        verify(s);
        return;
    }
    const size_t from = s.cache.size();
    s.cache.insert(s.cache.end(), t.req.prompt.begin() + from, t.req.prompt.begin() + from + n_added);
    if (s.cache.size() == t.n_prefill()) prefill_done(s);
}

void engine::prefill_done(slot & s) {
    task & t = *s.t;
    if (t.req.n_predict == 0) {  // nothing to generate: the prompt is cached, as llama.cpp does
        finish(s, FINISH_REASON_LENGTH);
        return;
    }
    t.generating = true;
    t.next_token = t.req.prompt.back();
    if (spec_ && t.spec.types != 0) {
        spec_->begin(s.id, t.spec.types, s.cache);
        // A new request starts from what its kind of draft has earned so far, server-wide.
        t.spec.acceptance = spec_->acceptance(speculative_first_type(t.spec.types));
    }
}

void engine::verify(slot & s) {
    task & t = *s.t;
    const int32_t k = (int32_t) t.spec.draft.size();
    const int32_t n0 = (int32_t) s.cache.size();  // cache index of next_token
    s.cache.push_back(t.next_token);

    int32_t n_accepted = 0;
    finish_reason reason = FINISH_REASON_NONE;
    std::string error;
    for (int32_t j = 0; j <= k; ++j) {
        llama_token tok = LLAMA_TOKEN_NULL;
        try {
            tok = t.smpl->sample(ctx_.get(), s.i_out + j);
        } catch (const constraint_error & e) {
            t.ev.bad_request = true;
            reason = FINISH_REASON_ERROR;
            error = e.what();
            break;
        } catch (const std::exception & e) {
            reason = FINISH_REASON_ERROR;
            error = std::string("sampling failed: ") + e.what();
            break;
        }
        shadow_check(t, tok);
        n_committed_step_++;
        reason = emit_token(s, tok, s.i_out + j);
        if (reason != FINISH_REASON_NONE) break;
        if (j < k && tok == t.spec.draft[(size_t) j]) {  // the draft token is what the model says
            s.cache.push_back(tok);
            n_accepted++;
            continue;
        }
        t.next_token = tok;
        break;
    }

    const int32_t n_real = std::min(t.spec.n_real, k);  // past it, padding
    if (n_real > 0) {
        const int32_t n_acc = std::min(n_accepted, n_real);
        t.n_drafted += n_real;
        t.n_accepted += n_acc;
        t.spec.acceptance = update_acceptance(t.spec.acceptance, n_real, n_acc);
        // A draft cut short and accepted whole says nothing against the rest: the drafting
        // type hears "all accepted" (ngram-mod would otherwise take the cut for misses and
        // reset its table).
        const int32_t n_told = n_acc == n_real && t.spec.n_offered > n_real ? t.spec.n_offered : n_acc;
        spec_->accept(s.id, t.spec.type_last, n_real, n_acc, n_told);
    }
    t.spec.n_real = 0;
    if (t.spec.n_tail > 0) {
        // The draft model's KV keeps what the target accepted of what it decoded itself.
        s.n_draft_synced = n0 + std::min(n_accepted + 1, t.spec.n_tail);
        if (!spec_->forget_from(s.id, s.n_draft_synced)) s.n_draft_synced = 0;
        t.spec.n_tail = 0;
    }
    t.spec.draft.clear();
    if ((int32_t) s.cache.size() < n0 + 1 + k && !forget_from(s, s.cache.size())) {
        // The rejected tokens could not leave the KV cache: it was dropped whole.
        if (reason == FINISH_REASON_NONE) {
            reason = FINISH_REASON_ERROR;
            error = "the KV cache could not drop rejected draft tokens";
        }
    }
    if (reason != FINISH_REASON_NONE) finish(s, reason, error);
}

void engine::shadow_check(task & t, llama_token tok) {
    auto & sp = t.spec;
    if (sp.shadow.empty()) return;
    // Token by token, as a verification would count it: a long right draft that was never
    // verified raises the estimate while it is being matched, not only once it is used up.
    const bool match = tok == sp.shadow[sp.shadow_pos];
    sp.acceptance = update_acceptance(sp.acceptance, 1, match ? 1 : 0);
    if (match) sp.shadow_pos++;
    if (!match || sp.shadow_pos == sp.shadow.size()) sp.shadow.clear();
}

finish_reason engine::emit_token(slot & s, llama_token tok, int32_t i_out) {
    task & t = *s.t;
    if (t.n_decoded == 0) t.t_first_us = now_us();
    t.n_decoded++;

    if (t.req.sampling.logprobs) {
        const float * logits = llama_get_logits_ith(ctx_.get(), i_out);  // checked by sample()
        t.ev.logprobs.push_back(t.smpl->logprob(logits, tok, t.req.sampling.n_probs));
    }
    if (model_->is_eog(tok) && !t.smpl->ignore_eos()) return FINISH_REASON_STOP;
    t.ev.tokens.push_back(tok);
    const auto r = t.stops.push(t.utf8.push(common_token_to_piece(model_->vocab(), tok, t.smpl->renders(tok))));
    t.ev.text += r.text;
    if (r.stopped) {
        t.ev.stop_word = r.stop_word;
        return FINISH_REASON_STOP;
    }
    if (t.req.n_predict >= 0 && t.n_decoded >= t.req.n_predict) return FINISH_REASON_LENGTH;
    // The token goes into the KV cache next: the slot's context must have room for it.
    if ((int32_t) s.cache.size() + 1 >= info_.n_ctx_slot) return FINISH_REASON_LENGTH;
    return FINISH_REASON_NONE;
}

}  // namespace llamabox
