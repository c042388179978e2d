"""Template-exact tokenization of ChatML records with assistant-only labels.

    qwen-sft tokenize processed/sft_train.jsonl -m offline -o processed/train.jsonl
    python binarize_data.py -input_path chatml.jsonl -output_path train.parquet -workers 2

The contract every written sample keeps: ``input_ids`` equal
``tok(tok.apply_chat_template(messages, tools=tools, tokenize=False), add_special_tokens=False).input_ids``.
"""
