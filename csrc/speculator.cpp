#include "speculator.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <queue>

#include "errors.h"
#include "log_sink.h"
#include "model.h"

namespace llamabox {

namespace {

// The types we schedule, in llama.cpp's order of preference (cheap n-gram lookups first).
struct type_name {
    common_speculative_type type;
    const char *            name;
};
constexpr type_name TYPES[] = {
    {COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE, "ngram-simple"},
    {COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K, "ngram-map-k"},
    {COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K4V, "ngram-map-k4v"},
    {COMMON_SPECULATIVE_TYPE_NGRAM_MOD, "ngram-mod"},
    {COMMON_SPECULATIVE_TYPE_NGRAM_CACHE, "ngram-cache"},
    {COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE, "draft-simple"},
};

constexpr int VOCAB_MAX_SIZE_DIFFERENCE = 128;  // as llama.cpp allows
constexpr int VOCAB_CHECK_FROM = 5;             // the first tokens (BOS, EOS, ...) may differ in text

double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Why the draft model cannot draft for the target; empty if it can.
std::string vocab_mismatch(const llama_model * tgt, const llama_model * dft) {
    const llama_vocab * vt = llama_model_get_vocab(tgt);
    const llama_vocab * vd = llama_model_get_vocab(dft);
    if (llama_vocab_type(vt) != llama_vocab_type(vd)) return "their tokenizers are of different types";
    if (llama_vocab_get_add_bos(vt) != llama_vocab_get_add_bos(vd) ||
        (llama_vocab_get_add_bos(vt) && llama_vocab_bos(vt) != llama_vocab_bos(vd))) {
        return "their BOS tokens differ";
    }
    if (llama_vocab_get_add_eos(vt) != llama_vocab_get_add_eos(vd) ||
        (llama_vocab_get_add_eos(vt) && llama_vocab_eos(vt) != llama_vocab_eos(vd))) {
        return "their EOS tokens differ";
    }
    const int nt = llama_vocab_n_tokens(vt), nd = llama_vocab_n_tokens(vd);
    if (std::abs(nt - nd) > VOCAB_MAX_SIZE_DIFFERENCE) {
        return "their vocabularies have " + std::to_string(nt) + " and " + std::to_string(nd) + " tokens";
    }
    for (int i = VOCAB_CHECK_FROM; i < std::min(nt, nd); ++i) {
        if (std::strcmp(llama_vocab_get_text(vt, i), llama_vocab_get_text(vd, i)) != 0) {
            return "token " + std::to_string(i) + " is '" + llama_vocab_get_text(vt, i) + "' in one and '" +
                   llama_vocab_get_text(vd, i) + "' in the other";
        }
    }
    return {};
}

}  // namespace

uint32_t speculative_type_bit(const std::string & name) {
    if (name == "draft") return SPEC_DRAFT_BIT;
    for (const auto & t : TYPES) {
        if (name == t.name) return 1u << t.type;
    }
    return 0;
}

std::string speculative_type_name(int32_t type) {
    for (const auto & t : TYPES) {
        if (t.type == type) return t.name;
    }
    return "none";
}

std::vector<std::string> speculative_type_names() {
    std::vector<std::string> out;
    for (const auto & t : TYPES) out.push_back(t.name);
    return out;
}

int32_t speculative_first_type(uint32_t mask) {
    for (const auto & t : TYPES) {
        if (mask & (1u << t.type)) return t.type;
    }
    return -1;
}

// ---- draft_policy ----

draft_policy::draft_policy() = default;

void draft_policy::observe_decode(int32_t n_tokens, double ms) {
    if (n_tokens <= 0 || n_tokens >= N_BUCKETS || !(ms > 0)) return;
    bucket & c = cost_[n_tokens];
    // The first step of a size may pay one-time costs (llama.cpp plans a new graph): it counts
    // only until the second. Then the median of the last N_RECENT: it follows the machine
    // (other load, a longer context) within a few steps, and one step that was preempted does
    // not move it.
    if (c.first) {  // kept until the next one of its size replaces it
        c.first = false;
        c.provisional = true;
        c.recent[0] = c.ms = ms;
        c.n = 1;
        refit();
        return;
    }
    if (c.provisional) {
        c.provisional = false;
        c.n = 0;
        c.next = 0;
    }
    c.recent[c.next] = ms;
    c.next = (c.next + 1) % N_RECENT;
    c.n = std::min(c.n + 1, N_RECENT);
    double v[N_RECENT];
    std::copy(c.recent, c.recent + c.n, v);
    std::nth_element(v, v + c.n / 2, v + c.n);
    c.ms = c.n % 2 == 1 ? v[c.n / 2] : 0.5 * (v[c.n / 2] + *std::max_element(v, v + c.n / 2));
    refit();
}

void draft_policy::refit() {
    // Weighted least squares over the sizes seen, each weighted by its observations kept.
    double w = 0, sn = 0, sm = 0, snn = 0, snm = 0;
    int32_t n_sizes = 0;
    for (int32_t n = 1; n < N_BUCKETS; ++n) {
        const bucket & c = cost_[n];
        if (c.n == 0) continue;
        const double wi = c.n;
        w += wi;
        sn += wi * n;
        sm += wi * c.ms;
        snn += wi * n * n;
        snm += wi * n * c.ms;
        n_sizes++;
    }
    if (w <= 0) return;
    const double mn = sn / w, mm = sm / w;
    const double var = snn / w - mn * mn;
    if (n_sizes < 2 || var <= 0) {
        // One size seen: assume a token costs a fifth of a one-token step, which lets drafts
        // start (and so the cost of more tokens be measured).
        b_ = mm / (mn + 4.0);
    } else {
        b_ = std::clamp((snm / w - mn * mm) / var, 0.02 * mm / mn, mm / mn);
    }
    a_ = std::max(0.0, mm - b_ * mn);
}

void draft_policy::observe_draft_step(double ms) {
    if (!(ms > 0)) return;
    draft_ms_ = draft_ms_ > 0 ? 0.8 * draft_ms_ + 0.2 * ms : ms;
}

void draft_policy::realized::add(double t, double m) {
    // Running means of a step's tokens and time (their ratio, not a mean of ratios: a step
    // that accepted a long draft weighs by its length), over ~8 steps.
    const double w = n < 8 ? 1.0 / (n + 1) : 0.125;
    tok += w * (t - tok);
    ms += w * (m - ms);
    n = std::min(n + 1, 1 << 20);
}

void draft_policy::observe_step(int32_t n_gen, int32_t n_drafted, int32_t n_committed, double ms,
                                double ms_drafting) {
    if (n_gen <= 0 || n_gen > 4096 || !(ms > 0)) return;
    if (ms_drafting >= 0) overhead_ms_ = 0.9 * overhead_ms_ + 0.1 * ms_drafting;
    if ((int32_t) guard_.size() <= n_gen) guard_.resize((size_t) n_gen + 1);
    guard & g = guard_[(size_t) n_gen];
    if (n_drafted > 0) {
        g.spec.add(n_committed, ms);
        g.since_plain++;
    } else {
        g.plain.add(n_committed, ms);
        g.since_plain = 0;
    }
}

double draft_policy::rate_plain(int32_t n_gen) const {
    return n_gen > 0 && n_gen < (int32_t) guard_.size() ? guard_[(size_t) n_gen].plain.rate() : 0.0;
}

double draft_policy::rate_spec(int32_t n_gen) const {
    return n_gen > 0 && n_gen < (int32_t) guard_.size() ? guard_[(size_t) n_gen].spec.rate() : 0.0;
}

double draft_policy::cost_per_token_ms() const { return b_; }

double draft_policy::cost_fixed_ms() const { return a_; }

double draft_policy::step_ms(int32_t n) const {
    // Between sizes seen: linear between the nearest two; outside them: the fitted line from
    // the nearest one seen (CPU batches get cheaper per row as they grow, which one line over
    // all sizes would miss).
    n = std::clamp(n, 1, N_BUCKETS - 1);
    if (cost_[n].n > 0) return cost_[n].ms;
    int32_t lo = n - 1, hi = n + 1;
    while (lo >= 1 && cost_[lo].n == 0) lo--;
    while (hi < N_BUCKETS && cost_[hi].n == 0) hi++;
    if (lo >= 1 && hi < N_BUCKETS) return cost_[lo].ms + (cost_[hi].ms - cost_[lo].ms) * (n - lo) / (double) (hi - lo);
    if (lo >= 1) return cost_[lo].ms + b_ * (n - lo);
    if (hi < N_BUCKETS) return std::max(0.0, cost_[hi].ms - b_ * (hi - n));
    return a_ + b_ * n;
}

void draft_policy::set_layout(bool stream_per_seq, int32_t n_ubatch, int32_t budget) {
    stream_per_seq_ = stream_per_seq;
    n_ubatch_ = std::max(1, n_ubatch);
    budget_ = std::max(0, budget);
}

std::vector<int32_t> draft_policy::split(const std::vector<int32_t> & seqs, std::vector<int32_t> len,
                                         int32_t n_other) const {
    std::vector<int32_t> out;
    if (!stream_per_seq_) {
        int32_t total = n_other;
        for (int32_t l : len) total += l;
        for (; total > 0; total -= n_ubatch_) out.push_back(std::min(total, n_ubatch_));
        return out;
    }
    const size_t n = seqs.size();
    while (true) {
        size_t s0 = 0;
        while (s0 < n && len[s0] == 0) s0++;
        if (s0 == n) break;
        size_t s1 = s0 + 1;
        while (s1 < n && len[s1] > 0 && seqs[s1] == seqs[s1 - 1] + 1) s1++;
        int32_t m = len[s0];
        for (size_t i = s0; i < s1; ++i) m = std::min(m, len[i]);
        const int32_t run = (int32_t) (s1 - s0);
        m = std::min(m, std::max(1, n_ubatch_ / run));
        for (size_t i = s0; i < s1; ++i) len[i] -= m;
        out.push_back(m * run);
    }
    for (; n_other > 0; n_other -= n_ubatch_) out.push_back(std::min(n_other, n_ubatch_));  // a prompt: its own
    return out;
}

double draft_policy::batch_ms(const std::vector<int32_t> & seqs, const std::vector<int32_t> & len, int32_t n_other) const {
    double ms = 0;
    for (int32_t u : split(seqs, len, n_other)) ms += step_ms(u);
    return ms;
}

std::vector<int32_t> draft_policy::allocate(const std::vector<slot_in> & slots, int32_t n_gen, int32_t n_other,
                                            const std::vector<int32_t> & gen_seqs) {
    std::vector<int32_t> k(slots.size(), 0);
    if (b_ <= 0) {  // nothing measured yet: one token each, to start measuring
        for (size_t i = 0; i < slots.size(); ++i) k[i] = std::min(slots[i].n_avail, 1);
        return k;
    }
    std::vector<int32_t> seqs = gen_seqs;
    if (seqs.empty()) {
        for (int32_t i = 0; i < n_gen; ++i) seqs.push_back(i);
    }
    // Where each slot's tokens sit in `seqs`.
    std::vector<size_t> at(slots.size(), 0);
    for (size_t i = 0; i < slots.size(); ++i) {
        const int32_t seq = slots[i].seq >= 0 ? slots[i].seq : (int32_t) i;
        at[i] = (size_t) (std::lower_bound(seqs.begin(), seqs.end(), seq) - seqs.begin());
        if (at[i] >= seqs.size() || seqs[at[i]] != seq) return k;  // not generating: no drafts
    }
    // Candidate draft tokens best first (slot i's next one adds acceptance_i^(k_i + 1)
    // expected tokens); the step's tokens per ms is evaluated after each, on the measured cost
    // curve and the ubatches the step would be cut into, and the best prefix of the order is
    // taken. Then the same depth for every slot (the shape a stream per slot decodes in one
    // ubatch) is tried too. A draft must beat plain decoding by a margin: an estimate that
    // only breaks even loses to noise and to what it does not count.
    constexpr double MARGIN = 1.05;
    std::vector<int32_t> len(seqs.size(), 1);
    const double plain_ms = batch_ms(seqs, len, n_other);
    const double plain = n_gen / plain_ms;
    std::vector<double> cost_at;  // the step's cost with the first m + 1 candidates of `order`
    double tokens = n_gen, extra_ms = 0.0, best = plain * MARGIN;
    int32_t depth_open = 0, n_taken = 0, n_best = 0;
    std::vector<size_t> order;
    using cand = std::pair<double, size_t>;
    std::priority_queue<cand> q;
    int32_t n_avail_max = 0;
    for (size_t i = 0; i < slots.size(); ++i) {
        if (slots[i].n_avail > 0) q.push({slots[i].acceptance, i});
        n_avail_max = std::max(n_avail_max, slots[i].n_avail);
    }
    const int32_t n_room = std::min(budget_, N_BUCKETS - 1 - n_gen - n_other);
    std::vector<int32_t> kk(slots.size(), 0);
    while (!q.empty() && n_taken < n_room) {
        const auto [gain, i] = q.top();
        q.pop();
        if (slots[i].model && kk[i] + 1 > depth_open) {  // a new depth: one more draft-model step
            extra_ms += draft_ms_;
            depth_open = kk[i] + 1;
        }
        kk[i]++;
        len[at[i]]++;
        n_taken++;
        tokens += gain;
        order.push_back(i);
        const double ms = batch_ms(seqs, len, n_other) + extra_ms;
        cost_at.push_back(ms);
        const double rate = tokens / ms;
        if (rate > best) {
            best = rate;
            n_best = n_taken;
        }
        if (kk[i] < slots[i].n_avail) q.push({gain * slots[i].acceptance, i});
    }
    int32_t depth_best = 0;  // > 0: the same depth for all, padded
    const bool uniform = stream_per_seq_ && seqs.size() > 1;
    if (uniform) {
        // Only shapes that add no ubatch: the greedy, ragged ones above are dropped.
        n_best = 0;
        best = plain * MARGIN;
        int32_t room_max = 0;
        for (const auto & sl : slots) room_max = std::max(room_max, sl.n_room >= 0 ? sl.n_room : sl.n_avail);
        for (int32_t d = 1; d <= room_max; ++d) {
            std::fill(len.begin(), len.end(), 1);
            double tok = n_gen, ms_draft = 0;
            int32_t n = 0;
            bool by_model = false;
            for (size_t i = 0; i < slots.size(); ++i) {
                const int32_t room = slots[i].n_room >= 0 ? slots[i].n_room : slots[i].n_avail;
                const int32_t ki = std::min(d, room), real = std::min(ki, slots[i].n_avail);
                len[at[i]] += ki;
                n += ki;
                by_model = by_model || (slots[i].model && real > 0);
                double g = 1.0;
                for (int32_t j = 0; j < real; ++j) tok += (g *= slots[i].acceptance);
            }
            if (n > n_room) break;
            if (by_model) ms_draft = d * draft_ms_;
            const double rate = tok / (batch_ms(seqs, len, n_other) + ms_draft);
            if (rate > best) {
                best = rate;
                depth_best = d;
            }
        }
    }

    bool probe = false;
    if (n_best > 0 || depth_best > 0) {
        probe_gap_ = PROBE_EVERY;
    } else if (!order.empty() && !uniform && ++n_declined_ >= probe_gap_) {
        // A probe: as many of the best candidates as the model believes cost at most PROBE_COST
        // plain steps, to measure sizes it may believe too dear. Each probe that does not
        // change its mind waits twice as long for the next, so that where drafts really do not
        // pay, probes cost next to nothing.
        n_best = 1;
        while (n_best < (int32_t) cost_at.size() && cost_at[(size_t) n_best] <= PROBE_COST * plain_ms) n_best++;
        n_probes_++;
        n_declined_ = 0;
        probe_gap_ = std::min(2 * probe_gap_, PROBE_GAP_MAX);
        probe = true;
    }
    if ((n_best > 0 || depth_best > 0) && !probe && n_other == 0 && n_gen < (int32_t) guard_.size()) {
        guard & g = guard_[(size_t) n_gen];
        // Plain decoding's rate: measured where there were plain steps, else the cost curve's
        // (plus what drafting itself costs a step).
        const double plain_now = g.plain.n >= 2 ? g.plain.rate() : n_gen / (plain_ms + overhead_ms_);
        if (g.spec.n >= 4 && g.spec.rate() < plain_now) {
            if (++g.held % HOLD_EVERY != 0) n_best = depth_best = 0;  // drafting loses here: held back
        } else if (g.plain.n >= 2 && g.since_plain >= PLAIN_EVERY) {
            n_best = depth_best = 0;  // a plain step, to keep the measured comparison current
        }
    }
    if (depth_best > 0) {
        for (size_t i = 0; i < slots.size(); ++i) {
            k[i] = std::min(depth_best, slots[i].n_room >= 0 ? slots[i].n_room : slots[i].n_avail);
        }
    } else {
        for (int32_t m = 0; m < n_best; ++m) k[order[(size_t) m]]++;
    }
    return k;
}

double update_acceptance(double prior, int32_t n_drafted, int32_t n_accepted) {
    // Each accepted token is a success; the first rejected one a failure. A pseudo-count of
    // 6 trials keeps one unlucky draft from deciding, and forgets a good start in ~20 misses.
    constexpr double K = 6.0;
    const double s = n_accepted, f = n_accepted < n_drafted ? 1.0 : 0.0;
    return std::clamp((prior * K + s) / (K + s + f), 0.02, 0.999);
}

// ---- speculator ----

speculator::speculator(const speculative_params & params, const model & target, const std::string & target_path,
                       llama_context * ctx_tgt, bool kv_unified, int32_t n_threads, int32_t n_threads_batch)
    : params_(params), ctx_tgt_(ctx_tgt) {
    n_seq_ = (int32_t) llama_n_seq_max(ctx_tgt);
    n_batch_ = (int32_t) llama_n_batch(ctx_tgt);
    if (params_.n_max < 0) throw load_error("the draft size (--draft) must be 0 or more");
    if (params_.n_min < 0) throw load_error("the minimum draft size (--draft-min) must be 0 or more");
    if (!(params_.p_min >= 0.0f && params_.p_min <= 1.0f)) throw load_error("--draft-p-min must be in [0, 1]");
    for (const auto & name : params_.types) {
        if (name == "none") continue;
        const uint32_t bit = speculative_type_bit(name);
        if (bit == 0) {
            std::string all;
            for (const auto & n : speculative_type_names()) all += (all.empty() ? "" : ", ") + n;
            throw load_error("unknown speculative type '" + name + "' (known: none, " + all + ")");
        }
        types_ |= bit;
    }
    if (!params_.draft_model.empty()) types_ |= SPEC_DRAFT_BIT;  // a draft model given is a draft model used
    if ((types_ & SPEC_DRAFT_BIT) && params_.draft_model.empty()) {
        throw load_error("speculative type draft-simple needs a draft model (--model-draft FILE)");
    }
    if (types_ != 0 && (llama_model_is_recurrent(target.get()) || llama_model_is_hybrid(target.get()))) {
        throw load_error("speculative decoding needs a KV cache that can drop rejected tokens; the recurrent "
                         "model " + target_path + " cannot");
    }

    if (!params_.draft_model.empty()) {
        model_params mp;
        mp.path = params_.draft_model;
        mp.n_gpu_layers = params_.draft_n_gpu_layers;
        mp.devices = params_.draft_devices;
        try {
            dft_model_ = std::make_unique<model>(mp);
        } catch (const load_error & e) {
            throw load_error(std::string("draft model: ") + e.what());
        }
        const std::string why = vocab_mismatch(target.get(), dft_model_->get());
        if (!why.empty()) {
            throw load_error("the draft model " + params_.draft_model + " cannot draft for " + target_path + ": " + why);
        }
        if (llama_model_is_recurrent(dft_model_->get()) || llama_model_is_hybrid(dft_model_->get())) {
            throw load_error("the draft model " + params_.draft_model + " is recurrent; its KV cache cannot drop "
                             "rejected tokens");
        }
        auto cp = llama_context_default_params();
        cp.n_ctx           = params_.draft_n_ctx > 0 ? (uint32_t) params_.draft_n_ctx : llama_n_ctx(ctx_tgt);
        cp.n_batch         = (uint32_t) n_batch_;
        cp.n_ubatch        = llama_n_ubatch(ctx_tgt);
        cp.n_seq_max       = (uint32_t) n_seq_;
        cp.n_threads       = params_.draft_n_threads > 0 ? params_.draft_n_threads : n_threads;
        cp.n_threads_batch = params_.draft_n_threads_batch > 0 ? params_.draft_n_threads_batch
                             : params_.draft_n_threads > 0 ? params_.draft_n_threads : n_threads_batch;
        cp.type_k          = kv_cache_type(params_.draft_cache_type_k);
        cp.type_v          = kv_cache_type(params_.draft_cache_type_v);
        cp.kv_unified      = kv_unified;
        cp.swa_full        = true;  // rejected drafts are removed from the tail
        cp.no_perf         = true;
        cp.n_outputs_max   = (uint32_t) n_seq_;  // a draft step asks one token per sequence
        log_capture capture;
        dft_ctx_.reset(llama_init_from_model(dft_model_->get(), cp));
        if (!dft_ctx_) {
            throw load_error("failed to create a context for the draft model " + params_.draft_model +
                             (capture.errors().empty() ? std::string() : ": " + capture.errors()));
        }
    }
    batch_ = llama_batch_init(n_batch_, 0, 1);
    // The server's own types are made now, so that a bad setting fails at start.
    for (const auto & t : TYPES) {
        if (!(types_ & (1u << t.type))) continue;
        try {
            instance(t.type, params_.p_min);
        } catch (const std::exception & e) {
            throw load_error(std::string("cannot set up speculative type ") + t.name + ": " + e.what());
        }
        if (!instance(t.type, params_.p_min)) throw load_error(std::string("cannot set up speculative type ") + t.name);
    }
}

speculator::~speculator() {
    ngram_.clear();
    dft_.clear();
    llama_batch_free(batch_);
}

uint32_t speculator::available_types() const {
    uint32_t all = 0;
    for (const auto & t : TYPES) all |= 1u << t.type;
    return dft_ctx_ ? all : all & ~SPEC_DRAFT_BIT;
}

double speculator::acceptance(int32_t type) const {
    const auto it = acceptance_.find(type);
    return it == acceptance_.end() ? 0.5 : it->second;
}

common_speculative * speculator::instance(int32_t type, float p_min) {
    const bool is_draft = type == COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE;
    if (is_draft) {
        const auto it = dft_.find(p_min);
        if (it != dft_.end()) return it->second.get();
    } else {
        const auto it = ngram_.find(type);
        if (it != ngram_.end()) return it->second.get();
    }
    common_params_speculative p;
    p.types = {(common_speculative_type) type};
    p.draft.n_max = std::max(1, params_.n_max);
    p.draft.n_min = 0;  // n_min is ours to apply, for every type alike
    p.draft.p_min = p_min;
    p.draft.ctx_tgt = ctx_tgt_;
    p.draft.ctx_dft = dft_ctx_.get();
    const auto map = [](const ngram_map_params & in) {
        common_params_speculative_ngram_map out;
        out.size_n = (uint16_t) in.size_n;
        out.size_m = (uint16_t) in.size_m;
        out.min_hits = (uint16_t) in.min_hits;
        return out;
    };
    p.ngram_simple = map(params_.ngram_simple);
    p.ngram_map_k = map(params_.ngram_map_k);
    p.ngram_map_k4v = map(params_.ngram_map_k4v);
    p.ngram_mod.n_match = params_.ngram_mod_n_match;
    p.ngram_mod.n_min = params_.ngram_mod_n_min;
    p.ngram_mod.n_max = params_.ngram_mod_n_max;
    p.ngram_cache.lookup_cache_static = params_.lookup_cache_static;
    p.ngram_cache.lookup_cache_dynamic = params_.lookup_cache_dynamic;
    common_speculative_ptr spec(common_speculative_init(p, (uint32_t) n_seq_));
    if (!spec) return nullptr;
    auto * raw = spec.get();
    if (is_draft) {
        dft_[p_min] = std::move(spec);
    } else {
        ngram_[type] = std::move(spec);
    }
    return raw;
}

void speculator::begin(int32_t seq, uint32_t types, const std::vector<llama_token> & history) {
    for (const auto & t : TYPES) {
        if (!(types & (1u << t.type)) || t.type == COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE) continue;
        if (auto * spec = instance(t.type, 0.0f)) common_speculative_begin(spec, seq, history);
    }
}

void speculator::run(common_speculative * spec, std::vector<draft_job *> & jobs) {
    for (auto * j : jobs) {
        auto & dp = common_speculative_get_draft_params(spec, j->seq);
        dp.drafting = true;
        dp.n_max = j->n_max;
        dp.pos0 = (llama_pos) j->history->size();
        dp.id_last = j->id_last;
        dp.prompt = j->history;
        dp.result = j->result;
    }
    common_speculative_draft(spec);
}

void speculator::draft(std::vector<draft_job> & jobs, bool model) {
    for (const auto & t : TYPES) {
        const bool is_draft = t.type == COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE;
        if (is_draft != model) continue;
        // The draft model runs once per p_min in use; the n-gram types once each.
        std::map<float, std::vector<draft_job *>> groups;
        for (auto & j : jobs) {
            if (j.n_max <= 0 || !j.result->empty() || !(j.types & (1u << t.type))) continue;
            groups[is_draft ? j.p_min : 0.0f].push_back(&j);
        }
        for (auto & [p_min, group] : groups) {
            if (is_draft && !sync_draft(group)) continue;
            if (group.empty()) continue;
            common_speculative * spec = instance(t.type, p_min);
            if (!spec) continue;
            const double t0 = now_ms();
            run(spec, group);
            if (is_draft) {
                size_t depth = 0;
                for (auto * j : group) depth = std::max(depth, j->result->size());
                policy_.observe_draft_step((now_ms() - t0) / (double) std::max<size_t>(depth, 1));
            }
            for (auto * j : group) {
                if (is_draft && j->n_tail) {
                    const llama_pos pos_max = llama_memory_seq_pos_max(llama_get_memory(dft_ctx_.get()), j->seq);
                    *j->n_tail = std::max<int32_t>(0, pos_max + 1 - (int32_t) j->history->size());
                }
                if ((int32_t) j->result->size() > j->n_max) j->result->resize((size_t) j->n_max);
                if (!j->result->empty() && (int32_t) j->result->size() < j->n_min) j->result->clear();
                if (!j->result->empty()) *j->type_used = t.type;
            }
        }
    }
}

bool speculator::sync_draft(std::vector<draft_job *> & jobs) {
    // Catches the draft model's KV up to each job's history, one batch at most a call.
    llama_memory_t mem = llama_get_memory(dft_ctx_.get());
    batch_.n_tokens = 0;
    std::vector<draft_job *> ready;
    std::vector<std::pair<draft_job *, int32_t>> syncing;  // job, its synced count after the batch
    for (auto * j : jobs) {
        const int32_t have = *j->n_synced, want = (int32_t) j->history->size();
        const int32_t room = n_batch_ - batch_.n_tokens;
        const int32_t n = std::min(want - have, room);
        for (int32_t i = have; i < have + n; ++i) {
            const int32_t k = batch_.n_tokens++;
            batch_.token[k] = (*j->history)[(size_t) i];
            batch_.pos[k] = i;
            batch_.n_seq_id[k] = 1;
            batch_.seq_id[k][0] = j->seq;
            batch_.logits[k] = false;
        }
        syncing.push_back({j, have + n});
    }
    if (batch_.n_tokens > 0) {
        batch_.logits[batch_.n_tokens - 1] = true;
        const int32_t ret = llama_decode(dft_ctx_.get(), batch_);
        if (ret != 0) {
            // Whatever the draft KV now holds of these tokens is unknown: drop them all.
            for (auto & [j, n] : syncing) {
                if (!llama_memory_seq_rm(mem, j->seq, *j->n_synced, -1)) {
                    llama_memory_seq_rm(mem, j->seq, -1, -1);
                    *j->n_synced = 0;
                }
            }
            jobs.clear();
            return false;
        }
    }
    for (auto & [j, n] : syncing) {
        *j->n_synced = n;
        if (n == (int32_t) j->history->size()) ready.push_back(j);
    }
    jobs.swap(ready);
    return true;
}

void speculator::accept(int32_t seq, int32_t type, int32_t n_drafted, int32_t n_accepted, int32_t n_told) {
    auto & a = acceptance_.try_emplace(type, 0.5).first->second;
    a = update_acceptance(a, n_drafted, n_accepted);
    if (type == COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE) return;  // its state is the draft KV
    if (auto * spec = instance(type, 0.0f)) common_speculative_accept(spec, seq, (uint16_t) std::min<int32_t>(n_told, UINT16_MAX));
}

bool speculator::forget_from(int32_t seq, llama_pos pos) {
    if (!dft_ctx_) return true;
    llama_memory_t mem = llama_get_memory(dft_ctx_.get());
    if (llama_memory_seq_rm(mem, seq, pos, -1)) return true;
    llama_memory_seq_rm(mem, seq, -1, -1);
    return false;
}

}  // namespace llamabox
