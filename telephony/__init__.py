"""The call edge every feature shares: the ``CallChannel`` port and its errors, the ports the flow interpreter
calls (patient directory, recognizer, consent, outreach), the consult categories, and the ARI client, ARI channel
adapter and RTP media receiver. It imports only ``ground``; features meet each other through it
(docs/architecture.md).
"""
