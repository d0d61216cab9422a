"""Gateways: the broker spoken to in other protocols.

- :mod:`cosy.gateways.http`: the OpenAI ``/v1/audio/speech`` API (``cosy http``); its voice names in
  :mod:`cosy.gateways.voice_names`, ``POST /v1/audio/voices`` in :mod:`cosy.gateways.voice_upload`, uploads
  and registry voices as a job's own prompt in :mod:`cosy.gateways.cloning`.
- :mod:`cosy.gateways.wyoming`: a Wyoming TTS server for Home Assistant (``cosy wyoming``).
- :mod:`cosy.gateways.grpc`: the official CosyVoice runtime's gRPC service, grpc.health.v1 and cosy.Status
  (``cosy grpc``; protos and generated modules in :mod:`cosy.gateways.proto`, the status reply in
  :mod:`cosy.gateways.grpc_status`).
- :mod:`cosy.gateways.runtime`: the official runtime's modes (sft, zero-shot, cross-lingual, instruct) as cosy
  jobs, for ``cosy grpc`` and the official ``/inference_*`` routes of ``cosy http``
  (:mod:`cosy.gateways.runtime_http`).
- :mod:`cosy.gateways.bridge`: the one broker client a gateway's requests share.
- :mod:`cosy.gateways.jobstream`: one request's job from submission to its last sample, for every gateway.
- :mod:`cosy.encode` (core, shared with `cosy say` and `cosy batch`): WAV, PCM, FLAC, MP3, Ogg Opus, AAC (ADTS).

Each needs the ``http`` extra (``pip install 'cosy-tts[http]'``), ``cosy grpc`` the ``grpc`` extra; nothing is
imported here so that ``import cosy.gateways`` stays free.
"""
