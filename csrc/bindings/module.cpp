// Python bindings of the engine. Python objects are made only here; every call that can wait
// or compute for long releases the GIL, and the engine thread never calls into Python.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "backends.h"
#include "build-info.h"
#include "chat_format.h"
#include "engine.h"
#include "ggml-backend.h"
#include "log_sink.h"
#include "model.h"
#include "rpc.h"
#include "scheduler.h"
#include "text.h"

namespace py = pybind11;
using namespace llamabox;

namespace {

// The Python exception of one of our C++ errors: its name in _core, and its args (message,
// param for InvalidRequest, both counts for ContextLength). Anything else is rethrown.
std::pair<const char *, py::tuple> error_of(std::exception_ptr p) {
    try {
        std::rethrow_exception(p);
    } catch (const load_error & e) {
        return {"LoadError", py::make_tuple(e.what())};
    } catch (const context_length_error & e) {
        return {"ContextLength", py::make_tuple(e.what(), "prompt", e.n_prompt, e.n_ctx_slot)};
    } catch (const invalid_request & e) {
        py::object param = e.param.empty() ? py::object(py::none()) : py::object(py::str(e.param));
        return {"InvalidRequest", py::make_tuple(e.what(), param)};
    } catch (const queue_full & e) {
        return {"QueueFull", py::make_tuple(e.what())};
    } catch (const engine_stopped & e) {
        return {"EngineStopped", py::make_tuple(e.what())};
    }
}

py::object error_type(const char * name) { return py::module_::import("llamabox._core").attr(name); }

// An exception instance for a job's error (a foreign one becomes a RuntimeError).
py::object error_object(std::exception_ptr p) {
    try {
        auto [name, args] = error_of(p);
        return error_type(name)(*args);
    } catch (const std::exception & e) {
        return py::reinterpret_borrow<py::object>(PyExc_RuntimeError)(e.what());
    }
}

constexpr size_t GIL_HOLD_MAX_BYTES = 4096;  // inputs this small are handled with the GIL held

py::object event_embedding(const event & ev) {
    if (ev.n_rows == 0) return py::none();
    const py::ssize_t n_cols = (py::ssize_t) ev.embedding.size() / ev.n_rows;
    py::array_t<float> arr({(py::ssize_t) ev.n_rows, n_cols});
    std::copy(ev.embedding.begin(), ev.embedding.end(), arr.mutable_data());
    return std::move(arr);
}

void bind_types(py::module_ & m) {
    py::class_<sampling_params>(m, "SamplingParams")
        .def(py::init<>())
        .def_readwrite("temperature", &sampling_params::temperature)
        .def_readwrite("top_k", &sampling_params::top_k)
        .def_readwrite("top_p", &sampling_params::top_p)
        .def_readwrite("min_p", &sampling_params::min_p)
        .def_readwrite("typical_p", &sampling_params::typical_p)
        .def_readwrite("repeat_penalty", &sampling_params::repeat_penalty)
        .def_readwrite("repeat_last_n", &sampling_params::repeat_last_n)
        .def_readwrite("presence_penalty", &sampling_params::presence_penalty)
        .def_readwrite("frequency_penalty", &sampling_params::frequency_penalty)
        .def_readwrite("seed", &sampling_params::seed)
        .def_readwrite("logit_bias", &sampling_params::logit_bias)
        .def_readwrite("grammar", &sampling_params::grammar)
        .def_readwrite("json_schema", &sampling_params::json_schema)
        .def_readwrite("ignore_eos", &sampling_params::ignore_eos)
        .def_readwrite("logprobs", &sampling_params::logprobs)
        .def_readwrite("n_probs", &sampling_params::n_probs)
        .def_readwrite("tool_grammar", &sampling_params::tool_grammar)
        .def_readwrite("grammar_lazy", &sampling_params::grammar_lazy)
        .def_readwrite("grammar_triggers", &sampling_params::grammar_triggers)
        .def_readwrite("preserved_tokens", &sampling_params::preserved_tokens)
        .def_readwrite("generation_prompt", &sampling_params::generation_prompt);

    py::class_<chat_render>(m, "ChatRender", "A chat rendered through the model's template (apply_chat).")
        .def(py::init<>())
        .def_readonly("prompt", &chat_render::prompt)
        .def_readonly("grammar", &chat_render::grammar)
        .def_readonly("grammar_lazy", &chat_render::grammar_lazy)
        .def_readonly("grammar_triggers", &chat_render::grammar_triggers)
        .def_readonly("preserved_tokens", &chat_render::preserved_tokens)
        .def_readonly("additional_stops", &chat_render::additional_stops)
        .def_readonly("generation_prompt", &chat_render::generation_prompt)
        .def_readonly("format", &chat_render::format)
        .def_readonly("format_name", &chat_render::format_name)
        .def_readonly("supports_thinking", &chat_render::supports_thinking)
        .def_readonly("parse_tool_calls", &chat_render::parse_tool_calls)
        .def_readonly("parses", &chat_render::parses);

    py::class_<chat_tool_call>(m, "ChatToolCall")
        .def_readonly("id", &chat_tool_call::id)
        .def_readonly("name", &chat_tool_call::name)
        .def_readonly("arguments", &chat_tool_call::arguments);
    py::class_<chat_delta>(m, "ChatDelta")
        .def_readonly("reasoning", &chat_delta::reasoning)
        .def_readonly("content", &chat_delta::content)
        .def_readonly("tool_index", &chat_delta::tool_index)
        .def_readonly("tool_id", &chat_delta::tool_id)
        .def_readonly("tool_name", &chat_delta::tool_name)
        .def_readonly("tool_arguments", &chat_delta::tool_arguments);
    py::class_<chat_message>(m, "ChatMessage")
        .def_readonly("content", &chat_message::content)
        .def_readonly("reasoning_content", &chat_message::reasoning_content)
        .def_readonly("tool_calls", &chat_message::tool_calls);
    // The text pushed so far is parsed again on each push (as llama.cpp's server does): short
    // answers take microseconds, and a long one is released from the GIL.
    py::class_<chat_parser>(m, "ChatParser", "Reads a model's answer into content, reasoning and tool calls.")
        .def(py::init<const chat_render &>(), py::arg("render"))
        .def("push", [](chat_parser & p, const std::string & text, bool is_final) {
            if (p.size() + text.size() <= GIL_HOLD_MAX_BYTES) return p.push(text, is_final);
            py::gil_scoped_release nogil;
            return p.push(text, is_final);
        }, py::arg("text"), py::arg("is_final") = false,
           "Adds generated text; returns the deltas it makes (is_final: the whole answer is in).")
        .def_property_readonly("message", &chat_parser::message, py::return_value_policy::copy);

    py::class_<speculative_override>(m, "SpeculativeOverride")
        .def(py::init<>())
        .def_readwrite("n_max", &speculative_override::n_max)
        .def_readwrite("n_min", &speculative_override::n_min)
        .def_readwrite("p_min", &speculative_override::p_min)
        .def_readwrite("type", &speculative_override::type);

    py::class_<request>(m, "Request")
        .def(py::init<>())
        .def_readwrite("id_req", &request::id_req)
        .def_property("kind", [](const request & r) { return (int) r.kind; },
                      [](request & r, int k) { r.kind = (request_kind) k; })
        .def_readwrite("prompt", &request::prompt)
        .def_readwrite("text", &request::text)
        .def_readwrite("document", &request::document)
        .def_readwrite("rerank", &request::rerank)
        .def_readwrite("add_special", &request::add_special)
        .def_readwrite("parse_special", &request::parse_special)
        .def_readwrite("n_predict", &request::n_predict)
        .def_readwrite("stop", &request::stop)
        .def_readwrite("sampling", &request::sampling)
        .def_readwrite("cache_prompt", &request::cache_prompt)
        .def_readwrite("speculative", &request::speculative)
        .def_readwrite("lora", &request::lora)
        .def_readwrite("has_lora", &request::has_lora)
        .def_readwrite("tag", &request::tag)
        .def_property(
            "media",  // file bytes for the markers in `text` (Engine.media_marker)
            [](const request & r) {
                py::list out;
                for (const auto & f : r.media) out.append(py::bytes(f));
                return out;
            },
            [](request & r, const std::vector<py::bytes> & files) {
                r.media.clear();
                for (const auto & f : files) r.media.emplace_back(f);
            });

    py::class_<token_logprob>(m, "TokenLogprob")
        .def_readonly("token", &token_logprob::token)
        .def_readonly("logprob", &token_logprob::logprob)
        .def_property_readonly("top", [](const token_logprob & lp) {
            py::list out;
            for (const auto & t : lp.top) out.append(py::make_tuple(t.token, t.logprob));
            return out;
        });

    py::class_<event>(m, "Event")
        .def_readonly("id_req", &event::id_req)
        .def_readonly("tokens", &event::tokens)
        .def_readonly("text", &event::text)
        .def_readonly("logprobs", &event::logprobs)
        .def_property_readonly("finish", [](const event & e) { return (int) e.finish; })
        .def_readonly("stop_word", &event::stop_word)
        .def_readonly("error", &event::error)
        .def_readonly("bad_request", &event::bad_request)
        .def_property_readonly("embedding", &event_embedding)
        .def_readonly("n_prompt", &event::n_prompt)
        .def_readonly("n_cached", &event::n_cached)
        .def_readonly("n_decoded", &event::n_decoded)
        .def_readonly("n_drafted", &event::n_drafted)
        .def_readonly("n_accepted", &event::n_accepted)
        .def_readonly("t_prompt_ms", &event::t_prompt_ms)
        .def_readonly("t_gen_ms", &event::t_gen_ms);

    py::class_<slot_info>(m, "SlotInfo")
        .def_readonly("id_slot", &slot_info::id_slot)
        .def_readonly("state", &slot_info::state)
        .def_readonly("n_cached", &slot_info::n_cached)
        .def_readonly("n_prompt", &slot_info::n_prompt)
        .def_readonly("n_decoded", &slot_info::n_decoded)
        .def_readonly("n_drafted", &slot_info::n_drafted)
        .def_readonly("n_accepted", &slot_info::n_accepted)
        .def_readonly("draft_acceptance", &slot_info::draft_acceptance)
        .def_readonly("tag", &slot_info::tag);

    py::class_<engine_stats>(m, "EngineStats")
        .def_readonly("n_slots", &engine_stats::n_slots)
        .def_readonly("n_busy", &engine_stats::n_busy)
        .def_readonly("n_queued", &engine_stats::n_queued)
        .def_readonly("kv_cells_used", &engine_stats::kv_cells_used)
        .def_readonly("kv_cells_total", &engine_stats::kv_cells_total)
        .def_readonly("n_prompt_tokens_total", &engine_stats::n_prompt_tokens_total)
        .def_readonly("t_prompt_ms_total", &engine_stats::t_prompt_ms_total)
        .def_readonly("n_tokens_predicted_total", &engine_stats::n_tokens_predicted_total)
        .def_readonly("t_predicted_ms_total", &engine_stats::t_predicted_ms_total)
        .def_readonly("n_tokens_drafted_total", &engine_stats::n_tokens_drafted_total)
        .def_readonly("n_tokens_drafted_accepted_total", &engine_stats::n_tokens_drafted_accepted_total)
        .def_readonly("n_decode_total", &engine_stats::n_decode_total)
        .def_readonly("n_decode_failed_total", &engine_stats::n_decode_failed_total)
        .def_readonly("n_requests_total", &engine_stats::n_requests_total)
        .def_readonly("n_media_inputs_total", &engine_stats::n_media_inputs_total)
        .def_readonly("n_media_cache_hits_total", &engine_stats::n_media_cache_hits_total)
        .def_readonly("n_media_encoded_total", &engine_stats::n_media_encoded_total)
        .def_readonly("t_media_encode_ms_total", &engine_stats::t_media_encode_ms_total)
        .def_readonly("n_media_cache_entries", &engine_stats::n_media_cache_entries)
        .def_readonly("n_media_decodes_total", &engine_stats::n_media_decodes_total)
        .def_readonly("slots", &engine_stats::slots);

    py::class_<model_info>(m, "ModelInfo")
        .def_readonly("path", &model_info::path)
        .def_readonly("description", &model_info::description)
        .def_readonly("architecture", &model_info::architecture)
        .def_readonly("n_params", &model_info::n_params)
        .def_readonly("size_bytes", &model_info::size_bytes)
        .def_readonly("n_vocab", &model_info::n_vocab)
        .def_readonly("n_ctx_train", &model_info::n_ctx_train)
        .def_readonly("n_embd", &model_info::n_embd)
        .def_readonly("n_ctx", &model_info::n_ctx)
        .def_readonly("n_ctx_slot", &model_info::n_ctx_slot)
        .def_readonly("n_swa", &model_info::n_swa)
        .def_readonly("chat_template", &model_info::chat_template)
        .def_readonly("chat_template_caps", &model_info::chat_template_caps)
        .def_readonly("fim_pre", &model_info::fim_pre)
        .def_readonly("fim_suf", &model_info::fim_suf)
        .def_readonly("fim_mid", &model_info::fim_mid)
        .def_readonly("bos", &model_info::bos)
        .def_readonly("eos", &model_info::eos)
        .def_readonly("add_bos", &model_info::add_bos)
        .def_readonly("embeddings", &model_info::embeddings)
        .def_readonly("pooling", &model_info::pooling)
        .def_readonly("n_embd_tokens_max", &model_info::n_embd_tokens_max)
        .def_readonly("n_cls_out", &model_info::n_cls_out)
        .def_readonly("vision", &model_info::vision)
        .def_readonly("audio", &model_info::audio);

    py::class_<prepared>(m, "Prepared", "Requests validated and ready for Engine.submit() (once).")
        .def_readonly("n_prompt", &prepared::n_prompt)
        .def_property_readonly("n_requests", [](const prepared & p) { return p.tasks.size(); });

    py::class_<ngram_map_params>(m, "NgramMapParams")
        .def(py::init<>())
        .def_readwrite("size_n", &ngram_map_params::size_n)
        .def_readwrite("size_m", &ngram_map_params::size_m)
        .def_readwrite("min_hits", &ngram_map_params::min_hits);

    py::class_<speculative_params>(m, "SpeculativeParams")
        .def(py::init<>())
        .def_readwrite("types", &speculative_params::types)
        .def_readwrite("n_max", &speculative_params::n_max)
        .def_readwrite("n_min", &speculative_params::n_min)
        .def_readwrite("p_min", &speculative_params::p_min)
        .def_readwrite("adaptive", &speculative_params::adaptive)
        .def_readwrite("draft_model", &speculative_params::draft_model)
        .def_readwrite("draft_n_gpu_layers", &speculative_params::draft_n_gpu_layers)
        .def_readwrite("draft_n_ctx", &speculative_params::draft_n_ctx)
        .def_readwrite("draft_n_threads", &speculative_params::draft_n_threads)
        .def_readwrite("draft_n_threads_batch", &speculative_params::draft_n_threads_batch)
        .def_readwrite("draft_cache_type_k", &speculative_params::draft_cache_type_k)
        .def_readwrite("draft_cache_type_v", &speculative_params::draft_cache_type_v)
        .def_readwrite("draft_devices", &speculative_params::draft_devices)
        .def_readwrite("ngram_simple", &speculative_params::ngram_simple)
        .def_readwrite("ngram_map_k", &speculative_params::ngram_map_k)
        .def_readwrite("ngram_map_k4v", &speculative_params::ngram_map_k4v)
        .def_readwrite("ngram_mod_n_match", &speculative_params::ngram_mod_n_match)
        .def_readwrite("ngram_mod_n_min", &speculative_params::ngram_mod_n_min)
        .def_readwrite("ngram_mod_n_max", &speculative_params::ngram_mod_n_max)
        .def_readwrite("lookup_cache_static", &speculative_params::lookup_cache_static)
        .def_readwrite("lookup_cache_dynamic", &speculative_params::lookup_cache_dynamic);

    py::class_<media_params>(m, "MediaParams")
        .def(py::init<>())
        .def_readwrite("path", &media_params::path)
        .def_readwrite("use_gpu", &media_params::use_gpu)
        .def_readwrite("n_threads", &media_params::n_threads)
        .def_readwrite("image_min_tokens", &media_params::image_min_tokens)
        .def_readwrite("image_max_tokens", &media_params::image_max_tokens)
        .def_readwrite("max_image_side", &media_params::max_image_side)
        .def_readwrite("n_cache", &media_params::n_cache)
        .def_readwrite("warmup", &media_params::warmup);

    py::class_<lora_adapter_params>(m, "LoraAdapterParams")
        .def(py::init<>())
        .def(py::init([](std::string path, float scale) { return lora_adapter_params{std::move(path), scale}; }),
             py::arg("path"), py::arg("scale") = 1.0f)
        .def_readwrite("path", &lora_adapter_params::path)
        .def_readwrite("scale", &lora_adapter_params::scale);

    py::class_<lora_adapter_info>(m, "LoraAdapter")
        .def_readonly("id", &lora_adapter_info::id)
        .def_readonly("path", &lora_adapter_info::path)
        .def_readonly("scale", &lora_adapter_info::scale);

    py::class_<load_progress, std::shared_ptr<load_progress>>(m, "LoadProgress")
        .def(py::init<>())
        .def_property_readonly("value", [](const load_progress & p) { return p.value.load(); },
                               "how much of the model's weights has loaded, 0..1")
        .def("cancel", [](load_progress & p) { p.cancelled.store(true); },
             "makes the load stop at its next tensor and raise LoadError");

    py::class_<engine_params>(m, "EngineParams")
        .def(py::init<>())
        .def_readwrite("model_path", &engine_params::model_path)
        .def_readwrite("n_ctx", &engine_params::n_ctx)
        .def_readwrite("n_parallel", &engine_params::n_parallel)
        .def_readwrite("n_batch", &engine_params::n_batch)
        .def_readwrite("n_ubatch", &engine_params::n_ubatch)
        .def_readwrite("n_threads", &engine_params::n_threads)
        .def_readwrite("n_threads_batch", &engine_params::n_threads_batch)
        .def_readwrite("n_gpu_layers", &engine_params::n_gpu_layers)
        .def_readwrite("flash_attn", &engine_params::flash_attn)
        .def_readwrite("cache_type_k", &engine_params::cache_type_k)
        .def_readwrite("cache_type_v", &engine_params::cache_type_v)
        .def_readwrite("use_mmap", &engine_params::use_mmap)
        .def_readwrite("use_mlock", &engine_params::use_mlock)
        .def_readwrite("repack", &engine_params::repack)
        .def_readwrite("seed", &engine_params::seed)
        .def_readwrite("kv_unified", &engine_params::kv_unified)
        .def_readwrite("swa_full", &engine_params::swa_full)
        .def_readwrite("n_queue_max", &engine_params::n_queue_max)
        .def_readwrite("embeddings", &engine_params::embeddings)
        .def_readwrite("pooling", &engine_params::pooling)
        .def_readwrite("chat_template", &engine_params::chat_template)
        .def_readwrite("speculative", &engine_params::speculative)
        .def_readwrite("rpc_servers", &engine_params::rpc_servers)
        .def_readwrite("loras", &engine_params::loras)
        .def_readwrite("lora_init_without_apply", &engine_params::lora_init_without_apply)
        .def_readwrite("media", &engine_params::media)
        .def_readwrite("progress", &engine_params::progress)
        .def_readwrite("verbose", &engine_params::verbose);
}

void bind_engine(py::module_ & m) {
    // Freeing an engine (its contexts, the model's weights, GPU buffers) can take long: it runs
    // with the GIL released, so the thread that drops the last reference (Engine.stop drops it
    // on an executor thread) keeps no other thread from running Python meanwhile.
    struct engine_deleter {
        void operator()(engine * e) const {
            py::gil_scoped_release nogil;
            std::default_delete<engine>()(e);
        }
    };
    py::class_<engine, std::unique_ptr<engine, engine_deleter>>(m, "Engine")
        .def(py::init<const engine_params &>(), py::call_guard<py::gil_scoped_release>(),
             "Loads the model and creates the context (blocking; releases the GIL).")
        .def("start", &engine::start)
        .def("stop", &engine::stop, py::call_guard<py::gil_scoped_release>())
        .def("prepare", [](const engine & e, request req, const std::vector<uint64_t> & ids) {
            return e.prepare(std::move(req), ids);  // small requests only: the GIL stays held
        }, py::arg("request"), py::arg("ids"),
           "Tokenizes, validates and builds the samplers, here (small requests; post_prepare for "
           "others). One request per id.")
        .def("post_prepare", [](engine & e, uint64_t id_job, request req, std::vector<uint64_t> ids) {
            e.post_prepare(id_job, std::move(req), std::move(ids));
        }, py::arg("id_job"), py::arg("request"), py::arg("ids"))
        .def("post_tokenize", &engine::post_tokenize, py::arg("id_job"), py::arg("text"),
             py::arg("add_special"), py::arg("parse_special"))
        .def("post_detokenize", &engine::post_detokenize, py::arg("id_job"), py::arg("tokens"))
        .def("post_template", &engine::post_template, py::arg("id_job"), py::arg("messages_json"),
             py::arg("add_generation_prompt"))
        .def("post_slot_action", [](engine & e, uint64_t id_job, int32_t id_slot, const std::string & action,
                                    std::string path) {
            engine::slot_action a;
            if (action == "save") a = engine::slot_action::save;
            else if (action == "restore") a = engine::slot_action::restore;
            else if (action == "erase") a = engine::slot_action::erase;
            else throw invalid_request("action must be save, restore or erase, not '" + action + "'");
            e.post_slot_action(id_job, id_slot, a, std::move(path));
        }, py::arg("id_job"), py::arg("id_slot"), py::arg("action"), py::arg("path") = std::string(),
           "A slot's KV to a file (save), back (restore) or dropped (erase), between two steps; "
           "the job's value is the outcome as JSON text.")
        .def("poll_jobs", [](engine & e) {
            std::vector<job_result> done;
            {
                py::gil_scoped_release nogil;
                done = e.poll_jobs();
            }
            // (id_job, value, error): value a Prepared, a token list or a str; error an exception
            // instance (the value is None then)
            py::list out;
            for (auto & r : done) {
                if (r.error) {
                    out.append(py::make_tuple(r.id_job, py::none(), error_object(r.error)));
                } else if (r.chat) {
                    out.append(py::make_tuple(r.id_job, py::cast(std::move(*r.chat)), py::none()));
                } else if (!r.prep.tasks.empty()) {
                    out.append(py::make_tuple(r.id_job, py::cast(std::move(r.prep)), py::none()));
                } else if (!r.text.empty() || r.tokens.empty()) {
                    // a job that gives text: detokenize, template (an empty token list: tokenize "")
                    out.append(py::make_tuple(r.id_job, py::str(r.text), py::none()));
                } else {
                    out.append(py::make_tuple(r.id_job, py::cast(r.tokens), py::none()));
                }
            }
            return out;
        }, "The results of finished jobs: (id_job, value, error) tuples.")
        .def("submit", [](engine & e, prepared & p) {
            if (p.tasks.empty()) throw std::invalid_argument("these requests were submitted already");
            py::gil_scoped_release nogil;
            e.submit(std::move(p));
        }, "Queues prepared requests, all or none (O(1) each).")
        .def("cancel", &engine::cancel, py::call_guard<py::gil_scoped_release>())
        .def("poll_events", [](engine & e) {
            std::vector<event> evs;
            {
                py::gil_scoped_release nogil;
                evs = e.poll_events();
            }
            return evs;
        })
        .def("notify_fd", &engine::notify_fd)
        .def("failure", [](const engine & e) -> std::optional<std::string> {
            std::string why = e.failure();
            if (why.empty()) return std::nullopt;
            return why;
        }, "Why the engine can no longer generate (a ggml RPC server went away), or None.")
        .def("stats", [](const engine & e) {
            py::gil_scoped_release nogil;
            return e.stats();
        })
        .def("lora_adapters", &engine::lora_adapters)
        .def("set_lora_scales", &engine::set_lora_scales, py::arg("scales"))
        .def_property_readonly("info", &engine::info, py::return_value_policy::reference_internal)
        // A short input takes microseconds: releasing the GIL for it would let another thread
        // take the GIL, and the caller (the event loop) wait for its return.
        .def("tokenize", [](const engine & e, const std::string & text, bool add_special, bool parse_special) {
            if (text.size() <= GIL_HOLD_MAX_BYTES) return e.tokenize(text, add_special, parse_special);
            py::gil_scoped_release nogil;
            return e.tokenize(text, add_special, parse_special);
        }, py::arg("text"), py::arg("add_special") = true, py::arg("parse_special") = true)
        .def("detokenize", [](const engine & e, const std::vector<llama_token> & tokens) {
            if (tokens.size() <= GIL_HOLD_MAX_BYTES / 4) return e.detokenize(tokens);
            py::gil_scoped_release nogil;
            return e.detokenize(tokens);
        }, py::arg("tokens"))
        .def("token_pieces", [](const engine & e, const std::vector<llama_token> & tokens) {
            std::vector<std::string> pieces;
            pieces.reserve(tokens.size());
            for (llama_token t : tokens) pieces.push_back(e.token_piece(t));
            py::list out;
            for (const auto & p : pieces) out.append(py::bytes(p));
            return out;
        })
        .def("media_marker", &engine::media_marker)
        .def("apply_chat_template", [](const engine & e, const std::string & messages_json, bool add_generation_prompt) {
            py::gil_scoped_release nogil;
            return e.apply_chat_template(messages_json, add_generation_prompt);
        }, py::arg("messages_json"), py::arg("add_generation_prompt") = true)
        .def("apply_chat", [](const engine & e, const std::string & inputs_json) {
            py::gil_scoped_release nogil;
            return e.apply_chat(inputs_json);
        }, py::arg("inputs_json"), "A chat with tools and reasoning settings rendered (model::apply_chat).")
        .def("post_chat", [](engine & e, uint64_t id_job, std::string inputs_json) {
            e.post_chat(id_job, std::move(inputs_json));
        }, py::arg("id_job"), py::arg("inputs_json"));
}

// Hooks for unit tests of the pure parts (scheduler, text), no model needed.
void bind_testing(py::module_ & m) {
    m.def("plan_step", [](const std::vector<std::tuple<int32_t, bool, int32_t, int32_t, uint64_t>> & slots,
                          int32_t n_batch, int32_t n_prefill_busy) {
        std::vector<slot_view> views;
        for (const auto & [id, gen, left, draft, arrival] : slots) views.push_back({id, gen, left, draft, arrival});
        std::vector<std::pair<int32_t, int32_t>> out;
        for (const auto & e : plan_step(views, n_batch, n_prefill_busy)) out.emplace_back(e.id_slot, e.n_tokens);
        return out;
    }, py::arg("slots"), py::arg("n_batch"), py::arg("n_prefill_busy") = 1 << 30,
       "slots: (id, generating, n_prompt_left, n_draft, t_arrival) tuples -> [(id, n_tokens)]");
    m.def("choose_slot", [](const std::vector<std::tuple<int32_t, std::vector<llama_token>, uint64_t>> & idle,
                            const std::vector<llama_token> & prompt) {
        std::vector<idle_slot_view> views;
        for (const auto & s : idle) views.push_back({std::get<0>(s), &std::get<1>(s), std::get<2>(s)});
        return choose_slot(views, prompt);
    });
    m.def("draft_allocate",
          [](const std::vector<std::tuple<int32_t, double, bool>> & slots, int32_t n_gen, int32_t n_other,
             const std::vector<std::pair<int32_t, double>> & decodes, double draft_step_ms) {
              draft_policy p;
              for (const auto & [n, ms] : decodes) p.observe_decode(n, ms);
              p.observe_draft_step(draft_step_ms);
              std::vector<draft_policy::slot_in> in;
              for (const auto & [n, a, model] : slots) in.push_back({n, a, model});
              return p.allocate(in, n_gen, n_other);
          },
          py::arg("slots"), py::arg("n_gen"), py::arg("n_other"), py::arg("decodes"), py::arg("draft_step_ms") = 0.0,
          "Draft tokens per slot ((n_avail, acceptance, by_model) each) after observing `decodes` "
          "((n_tokens, ms) each).");
    py::class_<draft_policy>(m, "DraftPolicy", "The draft policy alone, fed by hand.")
        .def(py::init<>())
        .def("observe_decode", &draft_policy::observe_decode, py::arg("n_tokens"), py::arg("ms"))
        .def("observe_draft_step", &draft_policy::observe_draft_step, py::arg("ms"))
        .def("observe_step", &draft_policy::observe_step, py::arg("n_gen"), py::arg("n_drafted"),
             py::arg("n_committed"), py::arg("ms"), py::arg("ms_drafting") = -1.0)
        .def("allocate", [](draft_policy & p, const std::vector<std::tuple<int32_t, double, bool>> & slots,
                            int32_t n_gen, int32_t n_other) {
            std::vector<draft_policy::slot_in> in;
            for (const auto & [n, a, model] : slots) in.push_back({n, a, model});
            return p.allocate(in, n_gen, n_other);
        }, py::arg("slots"), py::arg("n_gen"), py::arg("n_other") = 0,
           "Draft tokens per slot ((n_avail, acceptance, by_model) each).")
        .def("set_layout", &draft_policy::set_layout, py::arg("stream_per_seq"), py::arg("n_ubatch"),
             py::arg("budget"))
        .def("split", &draft_policy::split, py::arg("seqs"), py::arg("len"), py::arg("n_other") = 0)
        .def("step_ms", &draft_policy::step_ms)
        .def("rate_plain", &draft_policy::rate_plain)
        .def("rate_spec", &draft_policy::rate_spec)
        .def_readonly_static("PROBE_EVERY", &draft_policy::PROBE_EVERY)
        .def_readonly_static("HOLD_EVERY", &draft_policy::HOLD_EVERY)
        .def_readonly_static("PLAIN_EVERY", &draft_policy::PLAIN_EVERY);
    m.def("update_acceptance", &update_acceptance, py::arg("prior"), py::arg("n_drafted"), py::arg("n_accepted"));
    m.def("log_sink_installed", &log_sink_installed,
          "Whether llama.cpp logs into the process-wide sink (never a dangling one).");
    m.def("utf8_complete_prefix", [](const py::bytes & b) { return utf8_complete_prefix(std::string(b)); });
    m.def("utf8_sanitize", [](const py::bytes & b) { return utf8_sanitize(std::string(b)); });

    py::class_<utf8_decoder>(m, "Utf8Decoder")
        .def(py::init<>())
        .def("push", [](utf8_decoder & d, const py::bytes & b) { return d.push(std::string(b)); })
        .def("flush", &utf8_decoder::flush);

    py::class_<stop_matcher>(m, "StopMatcher")
        .def(py::init<std::vector<std::string>>())
        .def("push", [](stop_matcher & s, const std::string & text) {
            auto r = s.push(text);
            return py::make_tuple(r.text, r.stopped, r.stop_word);
        })
        .def("flush", &stop_matcher::flush);
}

}  // namespace

#ifndef LLAMABOX_BACKEND_NAME
#define LLAMABOX_BACKEND_NAME "cpu"
#endif

// What this build runs on: the backend it was built for, the ggml backends registered and
// their devices (with memory), llama.cpp's build and the CPU features it uses.
py::dict system_info() {
    py::dict out;
    out["backend"] = LLAMABOX_BACKEND_NAME;
    // The portable build's CPU library (None: ggml's CPU code is compiled into _core).
    const std::string variant = cpu_variant();
    out["cpu_variant"] = variant.empty() ? py::object(py::none()) : py::object(py::str(variant));
    out["llama_cpp_build"] = std::string(llama_build_info());
    py::list regs;
    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) regs.append(ggml_backend_reg_name(ggml_backend_reg_get(i)));
    out["backends"] = regs;
    py::list devs;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        size_t free = 0, total = 0;
        ggml_backend_dev_memory(dev, &free, &total);
        const char * type = "cpu";
        switch (ggml_backend_dev_type(dev)) {
            case GGML_BACKEND_DEVICE_TYPE_GPU:   type = "gpu"; break;
            case GGML_BACKEND_DEVICE_TYPE_IGPU:  type = "igpu"; break;
            case GGML_BACKEND_DEVICE_TYPE_ACCEL: type = "accel"; break;
            default: break;
        }
        py::dict d;
        d["name"] = ggml_backend_dev_name(dev);
        d["description"] = ggml_backend_dev_description(dev);
        d["type"] = type;
        d["memory_total"] = total;
        d["memory_free"] = free;
        devs.append(d);
    }
    out["devices"] = devs;
    out["system"] = std::string(llama_print_system_info());
    return out;
}

PYBIND11_MODULE(_core, m) {
    m.doc() = "llamabox's native engine (llama.cpp inside)";
    m.attr("__version__") = LLAMABOX_VERSION;
    load_backends();  // a build with loadable ggml backends: from this module's directory

    // Exception types: error_of() above says what each carries.
    py::object exc_invalid = py::exception<invalid_request>(m, "InvalidRequest", PyExc_ValueError);
    py::exception<context_length_error>(m, "ContextLength", exc_invalid.ptr());
    py::exception<load_error>(m, "LoadError", PyExc_RuntimeError);
    py::exception<queue_full>(m, "QueueFull", PyExc_RuntimeError);
    py::exception<engine_stopped>(m, "EngineStopped", PyExc_RuntimeError);
    py::register_exception_translator([](std::exception_ptr p) {
        if (!p) return;
        auto [name, args] = error_of(p);  // rethrows what is not ours
        PyErr_SetObject(error_type(name).ptr(), args.ptr());
    });

    m.attr("FINISH_NONE") = (int) FINISH_REASON_NONE;
    m.attr("FINISH_STOP") = (int) FINISH_REASON_STOP;
    m.attr("FINISH_LENGTH") = (int) FINISH_REASON_LENGTH;
    m.attr("FINISH_CANCELLED") = (int) FINISH_REASON_CANCELLED;
    m.attr("FINISH_ERROR") = (int) FINISH_REASON_ERROR;
    m.attr("KIND_COMPLETION") = (int) REQUEST_KIND_COMPLETION;
    m.attr("KIND_EMBEDDING") = (int) REQUEST_KIND_EMBEDDING;

    bind_types(m);
    bind_engine(m);
    m.def("speculative_type_names", &speculative_type_names,
          "The drafting types --spec-type and a request's speculative.type take.");
    m.def("rpc_server", &run_rpc_server, py::arg("host"), py::arg("port"), py::arg("n_threads"),
          py::arg("cache_dir") = std::string(), py::call_guard<py::gil_scoped_release>(),
          "Serves this machine's CPU to ggml RPC clients on host:port; blocks while it serves.");
    m.def("system_info", &system_info,
          "The build's backend, the ggml backends and devices it has, llama.cpp's build and CPU features.");
    m.def("builtin_chat_templates", &builtin_chat_templates,
          "The names of llama.cpp's built-in chat templates (--chat-template NAME).");
    auto testing = m.def_submodule("testing", "pure helpers exposed for unit tests");
    bind_testing(testing);
}
