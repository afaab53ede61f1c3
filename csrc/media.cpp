#include "media.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <stdexcept>

#include "errors.h"
#include "log_sink.h"
#include "model.h"
#include "mtmd-helper.h"
#include "mtmd.h"

namespace llamabox {

namespace {

using bitmap_ptr = std::unique_ptr<mtmd_bitmap, void (*)(mtmd_bitmap *)>;
using chunks_ptr = std::unique_ptr<mtmd_input_chunks, void (*)(mtmd_input_chunks *)>;

std::string random_marker() {
    std::random_device rd;
    char buf[64];
    std::snprintf(buf, sizeof buf, "<__llamabox_media_%08x%08x__>", rd(), rd());
    return buf;
}

// An RGB image scaled down so that its longer side is `side`, each output pixel the mean of the
// input pixels it covers (a box filter: no aliasing, and enough before a projector's own resize).
bitmap_ptr scale_down(const mtmd_bitmap * in, uint32_t side) {
    const uint32_t nx = mtmd_bitmap_get_nx(in), ny = mtmd_bitmap_get_ny(in);
    const double f = (double) side / (double) std::max(nx, ny);
    const uint32_t ox = std::max<uint32_t>(1, (uint32_t) (nx * f + 0.5)), oy = std::max<uint32_t>(1, (uint32_t) (ny * f + 0.5));
    const unsigned char * src = mtmd_bitmap_get_data(in);
    std::vector<unsigned char> out((size_t) ox * oy * 3);
    for (uint32_t y = 0; y < oy; ++y) {
        const uint32_t y0 = (uint32_t) ((uint64_t) y * ny / oy), y1 = std::max(y0 + 1, (uint32_t) ((uint64_t) (y + 1) * ny / oy));
        for (uint32_t x = 0; x < ox; ++x) {
            const uint32_t x0 = (uint32_t) ((uint64_t) x * nx / ox), x1 = std::max(x0 + 1, (uint32_t) ((uint64_t) (x + 1) * nx / ox));
            uint64_t sum[3] = {0, 0, 0};
            for (uint32_t yy = y0; yy < y1; ++yy) {
                const unsigned char * row = src + ((size_t) yy * nx + x0) * 3;
                for (uint32_t xx = x0; xx < x1; ++xx, row += 3) {
                    sum[0] += row[0];
                    sum[1] += row[1];
                    sum[2] += row[2];
                }
            }
            const uint64_t n = (uint64_t) (y1 - y0) * (x1 - x0);
            unsigned char * px = out.data() + ((size_t) y * ox + x) * 3;
            for (int c = 0; c < 3; ++c) px[c] = (unsigned char) ((sum[c] + n / 2) / n);
        }
    }
    bitmap_ptr b(mtmd_bitmap_init(ox, oy, out.data()), mtmd_bitmap_free);
    if (b) {
        const char * id = mtmd_bitmap_get_id(in);
        const std::string sid = std::string(id ? id : "") + "@" + std::to_string(ox) + "x" + std::to_string(oy);
        mtmd_bitmap_set_id(b.get(), sid.c_str());
    }
    return b;
}

}  // namespace

llama_token media_placeholder(const std::string & id, size_t i) {
    const uint64_t h = std::hash<std::string>{}(id) ^ ((uint64_t) i * 0x9E3779B97F4A7C15ull);
    const uint64_t m = (h ^ (h >> 31)) * 0xBF58476D1CE4E5B9ull;
    return (llama_token) (-2 - (int64_t) ((m ^ (m >> 29)) & 0x3FFFFFFF));  // never -1 (LLAMA_TOKEN_NULL)
}

void media_projector::ctx_deleter::operator()(mtmd_context * c) const { mtmd_free(c); }

media_projector::media_projector(const media_params & params, const model & m, int32_t n_threads)
    : params_(params), marker_(random_marker()) {
    auto mp = mtmd_context_params_default();
    mp.use_gpu          = params.use_gpu;
    mp.print_timings    = false;
    mp.n_threads        = params.n_threads > 0 ? params.n_threads : n_threads;
    mp.media_marker     = marker_.c_str();
    mp.warmup           = params.warmup;
    mp.image_min_tokens = params.image_min_tokens;
    mp.image_max_tokens = params.image_max_tokens;
    {
        log_capture capture;
        ctx_.reset(mtmd_init_from_file(params.path.c_str(), m.get(), mp));
        if (!ctx_) {
            throw load_error("failed to load the multimodal projector " + params.path +
                             (capture.errors().empty() ? std::string() : ": " + capture.errors()));
        }
    }
    mrope_  = mtmd_decode_use_mrope(ctx_.get());
    vision_ = mtmd_support_vision(ctx_.get());
    audio_  = mtmd_support_audio(ctx_.get());
    n_embd_ = llama_model_n_embd_inp(m.get());
}

media_projector::~media_projector() = default;

void media_projector::mrope_positions(const mtmd_input_chunk * c, media_chunk & mc) const {
    auto pos = std::make_shared<std::vector<llama_pos>>((size_t) mc.n_tokens * 4);
    const mtmd_image_tokens * img = mtmd_input_chunk_get_tokens_image(c);
    if (img == nullptr) {  // audio: one position per row, the same in every component
        for (int32_t i = 0; i < mc.n_tokens; ++i) std::fill_n(pos->begin() + (size_t) i * 4, 4, (llama_pos) i);
        mc.mrope_shift = 0xF;
    } else {
        // libmtmd's own positions (what mtmd_helper_decode_image_chunk decodes with), for the
        // input at 0 and at 1: a component that differs moves with the input's place.
        uint8_t shift = 0;
        for (int32_t i = 0; i < mc.n_tokens; ++i) {
            const mtmd_decoder_pos p0 = mtmd_image_tokens_get_decoder_pos(img, 0, (size_t) i);
            const mtmd_decoder_pos p1 = mtmd_image_tokens_get_decoder_pos(img, 1, (size_t) i);
            // the batch's section order: t, y, x, z (libmtmd's set_position_mrope_2d)
            const uint32_t c0[4] = {p0.t, p0.y, p0.x, p0.z}, c1[4] = {p1.t, p1.y, p1.x, p1.z};
            for (int j = 0; j < 4; ++j) {
                (*pos)[(size_t) i * 4 + j] = (llama_pos) c0[j];
                if (c1[j] != c0[j]) shift |= (uint8_t) (1u << j);
            }
        }
        mc.mrope_shift = shift;
    }
    mc.mrope = std::move(pos);
}

media_stats media_projector::stats() const {
    std::lock_guard<std::mutex> lk(mtx_cache_);
    media_stats s = stats_;
    s.n_cache_entries = (int32_t) lru_.size();
    return s;
}

std::shared_ptr<const std::vector<float>> media_projector::embed(const mtmd_input_chunk * chunk,
                                                                 const std::string & id) const {
    const auto lookup = [&]() -> std::shared_ptr<const std::vector<float>> {
        std::lock_guard<std::mutex> lk(mtx_cache_);
        const auto it = index_.find(id);
        if (it == index_.end()) return nullptr;
        lru_.splice(lru_.end(), lru_, it->second);  // most recently used last
        return it->second->second;
    };
    {
        auto hit = lookup();
        std::lock_guard<std::mutex> lk(mtx_cache_);
        stats_.n_inputs++;
        if (hit) {
            stats_.n_cache_hits++;
            return hit;
        }
    }
    std::lock_guard<std::mutex> lk_enc(mtx_encode_);
    if (auto hit = lookup()) {  // encoded by another request while this one waited
        std::lock_guard<std::mutex> lk(mtx_cache_);
        stats_.n_cache_hits++;
        return hit;
    }
    const size_t n_tokens = mtmd_input_chunk_get_n_tokens(chunk);
    const auto t0 = std::chrono::steady_clock::now();
    {
        log_capture capture;
        if (mtmd_encode_chunk(ctx_.get(), chunk) != 0) {
            throw std::runtime_error("the multimodal projector failed to encode an input" +
                                     (capture.errors().empty() ? std::string() : ": " + capture.errors()));
        }
    }
    const float * rows = mtmd_get_output_embd(ctx_.get());
    if (rows == nullptr) throw std::runtime_error("the multimodal projector gave no embeddings");
    auto embd = std::make_shared<const std::vector<float>>(rows, rows + n_tokens * (size_t) n_embd_);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

    std::lock_guard<std::mutex> lk(mtx_cache_);
    stats_.n_encoded++;
    stats_.t_encode_ms += ms;
    if (params_.n_cache > 0) {
        lru_.emplace_back(id, embd);
        index_[id] = std::prev(lru_.end());
        while ((int32_t) lru_.size() > params_.n_cache) {
            index_.erase(lru_.front().first);
            lru_.pop_front();
        }
    }
    return embd;
}

std::vector<llama_token> media_projector::tokenize(const std::string & text, const std::vector<std::string> & files,
                                                   bool add_special, bool parse_special,
                                                   std::vector<media_chunk> & chunks) const {
    std::vector<bitmap_ptr> bitmaps;
    for (size_t i = 0; i < files.size(); ++i) {
        const std::string param = "media[" + std::to_string(i) + "]";
        const auto & f = files[i];
        bitmap_ptr b(mtmd_helper_bitmap_init_from_buf(ctx_.get(), (const unsigned char *) f.data(), f.size(), false,
                                                      mtmd_helper_init_opt_default()).bitmap,
                     mtmd_bitmap_free);
        if (!b) {
            throw invalid_request(param + " could not be decoded: send a PNG, JPEG, GIF or BMP image" +
                                  std::string(audio_ ? ", or WAV, MP3 or FLAC audio" : ""), param);
        }
        const bool is_audio = mtmd_bitmap_is_audio(b.get());
        if (is_audio && !audio_) throw invalid_request(param + " is audio, which this model's projector does not take", param);
        if (!is_audio && !vision_) throw invalid_request(param + " is an image, which this model's projector does not take", param);
        if (!is_audio && params_.max_image_side > 0 &&
            std::max(mtmd_bitmap_get_nx(b.get()), mtmd_bitmap_get_ny(b.get())) > (uint32_t) params_.max_image_side) {
            b = scale_down(b.get(), (uint32_t) params_.max_image_side);
            if (!b) throw std::runtime_error("scaling " + param + " down failed");
        }
        bitmaps.push_back(std::move(b));
    }
    std::vector<const mtmd_bitmap *> ptrs;
    for (const auto & b : bitmaps) ptrs.push_back(b.get());

    mtmd_input_text in = {text.c_str(), text.size(), add_special, parse_special};
    chunks_ptr out(mtmd_input_chunks_init(), mtmd_input_chunks_free);
    if (!out) throw std::runtime_error("mtmd_input_chunks_init failed");
    int32_t rc = 0;
    std::string why;
    {
        log_capture capture;
        rc = mtmd_tokenize(ctx_.get(), out.get(), &in, ptrs.data(), ptrs.size());
        why = capture.errors();
    }
    if (rc == 1) {
        throw invalid_request("the prompt has a different number of media markers than media inputs (" +
                              std::to_string(files.size()) + ")", "prompt");
    }
    if (rc != 0) throw invalid_request("the media could not be prepared for the projector" + (why.empty() ? "" : ": " + why), "media");

    std::vector<llama_token> tokens;
    size_t i_media = 0;
    for (size_t i = 0; i < mtmd_input_chunks_size(out.get()); ++i) {
        const mtmd_input_chunk * c = mtmd_input_chunks_get(out.get(), i);
        if (mtmd_input_chunk_get_type(c) == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            size_t n = 0;
            const llama_token * t = mtmd_input_chunk_get_tokens_text(c, &n);
            tokens.insert(tokens.end(), t, t + n);
            continue;
        }
        media_chunk mc;
        mc.pos        = tokens.size();
        mc.n_tokens   = (int32_t) mtmd_input_chunk_get_n_tokens(c);
        mc.n_pos      = (int32_t) mtmd_input_chunk_get_n_pos(c);
        mc.non_causal = mtmd_decode_use_non_causal(ctx_.get(), c);
        if (mrope_) mrope_positions(c, mc);
        const char * id = mtmd_input_chunk_get_id(c);
        mc.id = id != nullptr ? id : "";
        if (mc.id.empty()) throw std::runtime_error("a media chunk has no id");
        if (mc.n_tokens <= 0) throw invalid_request("media[" + std::to_string(i_media) + "] gives no embeddings", "media[" + std::to_string(i_media) + "]");
        mc.embd = embed(c, mc.id);
        for (int32_t j = 0; j < mc.n_tokens; ++j) tokens.push_back(media_placeholder(mc.id, (size_t) j));
        chunks.push_back(std::move(mc));
        i_media++;
    }
    return tokens;
}

}  // namespace llamabox
