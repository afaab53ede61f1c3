// The multimodal projector (--mmproj): images (and audio) in a prompt through llama.cpp's
// libmtmd. A prompt with media becomes tokens in which each media input holds a run of
// placeholder tokens, one per embedding row it decodes to, and a media_chunk per input with the
// rows themselves (request.h). Placeholders are negative and derived from the input's content
// hash and their index in it, so the slot's cached tokens, prefix matching and the
// context-length check work on them unchanged: the same image at the same place matches, any
// other image does not.
//
// Under M-RoPE an image's rows take fewer positions than their count (media_chunk::n_pos); the
// slot keeps the difference (slot::spans), so its cache indices still count KV cells.
//
// Thread safety: tokenize() from any thread (decoding and resizing run in parallel; encoding is
// serialized, libmtmd's context computes one graph at a time); stats() from any thread.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "request.h"

struct mtmd_context;
struct mtmd_input_chunk;

namespace llamabox {

class model;

struct media_params {
    std::string path;                 // the projector GGUF; empty: none
    bool        use_gpu          = true;   // false: --no-mmproj-offload
    int32_t     n_threads        = 0;      // 0: the engine's
    int32_t     image_min_tokens = -1;     // dynamic-resolution projectors only; -1 = the file's
    int32_t     image_max_tokens = -1;
    int32_t     max_image_side   = 0;      // --visual-max-image-size: larger images are scaled down; 0 = none
    int32_t     n_cache          = 16;     // --max-projected-cache: distinct inputs' embeddings kept
    bool        warmup           = true;
};

struct media_stats {
    int64_t n_inputs        = 0;  // media inputs prepared
    int64_t n_cache_hits    = 0;  // of which the projected cache had
    int64_t n_encoded       = 0;  // of which were encoded
    double  t_encode_ms     = 0.0;
    int32_t n_cache_entries = 0;
};

// A negative token standing for row i of the media input whose content hash is `id`.
llama_token media_placeholder(const std::string & id, size_t i);

class media_projector {
public:
    media_projector(const media_params & params, const model & m, int32_t n_threads);  // throws load_error
    ~media_projector();
    media_projector(const media_projector &) = delete;
    media_projector & operator=(const media_projector &) = delete;

    bool vision() const { return vision_; }
    bool audio() const { return audio_; }
    // What marks each media input's place in a prompt text: random per process, so that no
    // text a user writes can stand for one.
    const std::string & marker() const { return marker_; }

    // `text` holds marker() once per file of `files` (image or audio file bytes, in order).
    // Returns the prompt's tokens; `chunks` gets each input's place and embeddings (encoded, or
    // from the projected cache). Throws invalid_request naming "media[i]" for a file that cannot
    // be used, or "prompt" for markers that do not match the files.
    std::vector<llama_token> tokenize(const std::string & text, const std::vector<std::string> & files,
                                      bool add_special, bool parse_special, std::vector<media_chunk> & chunks) const;

    media_stats stats() const;

private:
    std::shared_ptr<const std::vector<float>> embed(const mtmd_input_chunk * chunk, const std::string & id) const;
    void mrope_positions(const mtmd_input_chunk * chunk, media_chunk & mc) const;

    struct ctx_deleter { void operator()(mtmd_context * c) const; };
    std::unique_ptr<mtmd_context, ctx_deleter> ctx_;
    media_params params_;
    int32_t      n_embd_ = 0;
    bool         vision_ = false;
    bool         audio_  = false;
    bool         mrope_  = false;
    std::string  marker_;

    // The projected cache: embeddings by content hash, least recently used first out.
    using cache_list = std::list<std::pair<std::string, std::shared_ptr<const std::vector<float>>>>;
    mutable std::mutex mtx_encode_;  // one encode at a time
    mutable std::mutex mtx_cache_;   // the cache and the stats
    mutable cache_list lru_;
    mutable std::unordered_map<std::string, cache_list::iterator> index_;
    mutable media_stats stats_;
};

}  // namespace llamabox
