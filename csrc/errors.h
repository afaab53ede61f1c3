// Errors with a meaning for the caller; the bindings map them to Python exception types.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace llamabox {

struct load_error : std::runtime_error { using std::runtime_error::runtime_error; };
// A request the engine cannot serve as given (HTTP 400); `param` names the field at fault.
struct invalid_request : std::invalid_argument {
    explicit invalid_request(const std::string & message, std::string param = {})
        : std::invalid_argument(message), param(std::move(param)) {}
    std::string param;
};
struct queue_full : std::runtime_error { using std::runtime_error::runtime_error; };
struct engine_stopped : std::runtime_error { using std::runtime_error::runtime_error; };

// The prompt does not fit the slot's context (HTTP 400, OpenAI's context_length_exceeded).
struct context_length_error : invalid_request {
    context_length_error(int32_t n_prompt, int32_t n_ctx_slot)
        : invalid_request("prompt has " + std::to_string(n_prompt) + " tokens, context per slot is " +
                              std::to_string(n_ctx_slot), "prompt"),
          n_prompt(n_prompt), n_ctx_slot(n_ctx_slot) {}
    int32_t n_prompt;
    int32_t n_ctx_slot;
};

}  // namespace llamabox
