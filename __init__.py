"""agentfleet: LLM agent workloads at high throughput over Redis streams and vLLM workers.

Installed, this folder is the `agentfleet` package (pyproject.toml maps it): its rooms are
`agentfleet.schemas` (the wire contract), `agentfleet.producer` (what a backend imports),
`agentfleet.workers` (what runs beside the engine) and `agentfleet.ops` (what an SRE runs).
The names below are the public API a backend service needs; the client install
(`pip install agentfleet`) brings only msgspec and redis.

    from agentfleet import Producer, Task
"""

from agentfleet.producer import Producer, SyncProducer
from agentfleet.producer.steps import tool_reply
from agentfleet.schemas import (
    SCHEMA_VERSION,
    AgentFleetError,
    BrokerError,
    Condition,
    ErrorCode,
    FollowUp,
    FunctionCall,
    FunctionDef,
    FunctionName,
    JsonSchema,
    Message,
    ModelSpec,
    PromptTooLongError,
    ResponseFormat,
    Result,
    ResultTimeoutError,
    Sampling,
    Settings,
    Status,
    Task,
    Timings,
    Tool,
    ToolCall,
    ToolChoice,
    UnknownModelError,
    ValidationError,
)

__version__ = "0.2.0"

__all__ = [
    "SCHEMA_VERSION", "AgentFleetError", "BrokerError", "ErrorCode", "FollowUp", "Message",
    "ModelSpec", "Producer", "PromptTooLongError", "Result", "ResultTimeoutError", "Sampling",
    "Settings", "Status", "SyncProducer", "Task", "Timings", "UnknownModelError",
    "ValidationError", "__version__",
    # agent steps (docs/agent-steps.md)
    "Condition", "FunctionCall", "FunctionDef", "FunctionName", "JsonSchema", "ResponseFormat",
    "Tool", "ToolCall", "ToolChoice", "tool_reply",
]
