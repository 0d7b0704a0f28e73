"""CoAP building blocks of the CoAP ingress.

- :mod:`.codec`: RFC 7252 message parsing and serialization (sans-I/O, pure functions);
- :mod:`.dedup`: message deduplication with cached responses (RFC 7252 §4.5, sans-I/O);
- :mod:`.pubsub`: the publish-subscribe vocabulary (draft-ietf-core-coap-pubsub: topic
  parameters, representations, link-format, ETags, content formats, refusals; sans-I/O).

Bytes and plain values in, bytes and plain values out: no socket, no clock, no broker.
The CoAP ingress (:mod:`rapidmq_edge.ingress.coap_server`, the UDP socket in
:mod:`rapidmq_edge.ingress.coap_udp`) builds the publish-subscribe broker on these.
"""
