"""Cases of the request policy that every entry point is checked against (``tests/engine``:
``LLM.chat``; ``tests/remote``: the local server, ``serve --base-url`` and ``RemoteLLM.chat``)."""

from __future__ import annotations

BAD_CHATS = [  # (a bad chat, the one message every entry point gives for it)
    ([], "messages: give a non-empty list of messages ({role, content} objects)"),
    (["hi"], "messages[0]: a message is a {role, content} object, got str"),
    ([{"role": "wizard", "content": "x"}],
     "messages[0].role: must be one of system, developer, user, assistant; got 'wizard'"),
    ([{"role": "user", "content": "a"}, {"role": "user"}], "messages[1].content: a user message needs its content"),
    ([{"role": "user", "content": 7}], "messages[0].content: must be a string or a list of text parts, got int"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     "messages[0].content[0]: only text parts ({type: text, text}) are taken, got 'image_url'"),
]  # fmt: skip
