"""CoAP building blocks of the CoAP ingress.

- :mod:`.codec`: RFC 7252 message parsing and serialization (sans-I/O, pure functions);
- :mod:`.dedup`: message deduplication with cached responses (RFC 7252 §4.5, sans-I/O);
- :mod:`.pubsub`: the publish-subscribe vocabulary (draft-ietf-core-coap-pubsub: topic
  parameters, representations, link-format, ETags, content formats; sans-I/O);
- :mod:`.endpoint`: the UDP socket shared by the publish fast path and aiocoap (I/O).

:mod:`rapidmq_edge.ingress.coap` builds the publish-subscribe broker on these.
"""
