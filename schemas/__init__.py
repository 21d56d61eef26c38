"""The contract shared by producers and workers: wire format, key names, errors, settings."""

from agentfleet.schemas.errors import (
    AgentFleetError,
    BrokerError,
    ErrorCode,
    PromptTooLongError,
    ResultTimeoutError,
    UnknownModelError,
    ValidationError,
)
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.wire import (
    SCHEMA_VERSION,
    Condition,
    FollowUp,
    FunctionCall,
    FunctionDef,
    FunctionName,
    JsonSchema,
    Message,
    ResponseFormat,
    Result,
    Sampling,
    Status,
    Task,
    Timings,
    Tool,
    ToolCall,
    ToolChoice,
)

__all__ = [
    "SCHEMA_VERSION", "AgentFleetError", "BrokerError", "ErrorCode", "FollowUp", "Message",
    "ModelSpec", "PromptTooLongError", "Result", "ResultTimeoutError", "Sampling", "Settings",
    "Status", "Task", "Timings", "UnknownModelError", "ValidationError",
    # agent steps (docs/agent-steps.md)
    "Condition", "FunctionCall", "FunctionDef", "FunctionName", "JsonSchema", "ResponseFormat",
    "Tool", "ToolCall", "ToolChoice",
]
