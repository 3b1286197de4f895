"""The IVR: flow model, loader and interpreter, the ``CallChannel`` port and its adapters, prompts."""

from ivr.flow_loader import FlowError, FlowProblem, LoadedFlow, load_flow, load_flows
from ivr.interpreter import FlowResult, run_flow
from ivr.memory_channel import InMemoryCallChannel
from telephony.channel import CallChannel, CallerHungUp, CallInfo, ChannelError, ConnectionLost

__all__ = [
    "CallChannel",
    "CallInfo",
    "CallerHungUp",
    "ChannelError",
    "ConnectionLost",
    "FlowError",
    "FlowProblem",
    "FlowResult",
    "InMemoryCallChannel",
    "LoadedFlow",
    "load_flow",
    "load_flows",
    "run_flow",
]
