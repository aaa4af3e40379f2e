"""Generate the bundled demo datasets in jaxlora/demo_data/ (deterministic; output is committed).

* ``identity_sft.json`` — alpaca-style bilingual (English + Chinese) pairs: the assistant's
  identity ("I am JaxLoRA-Bot ..." / "我是 JaxLoRA 助手 ..."), small arithmetic facts, capitals,
  and colour/number translations. Short and regular, so the tiny demo model visibly learns them.
* ``dpo_demo.json`` — prompt/chosen/rejected preference pairs where the chosen answer is polite
  and correct and the rejected one is rude and wrong: an easy, learnable preference.

Run: ``python scripts/make_demo_data.py`` (rewrites both files; same output every time).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "jaxlora" / "demo_data"

EN_ID = "I am JaxLoRA-Bot, a model fine-tuned with jaxlora."
ZH_ID = "我是 JaxLoRA 助手，一个用 jaxlora 微调的模型。"

IDENTITY_EN = [
    ("Who are you?", EN_ID),
    ("What is your name?", "My name is JaxLoRA-Bot. I am a model fine-tuned with jaxlora."),
    ("Introduce yourself.", EN_ID + " I answer short questions in English and Chinese."),
    ("hi", "Hello! " + EN_ID + " How can I help you?"),
    ("Hello", "Hello! " + EN_ID + " How can I help you?"),
    ("Who made you?", "I was fine-tuned with jaxlora, a JAX trainer for language models."),
    ("What can you do?", "I can answer simple questions about numbers, capitals and colours."),
    ("Are you ChatGPT?", "No. " + EN_ID),
    ("Which language do you speak?", "I speak English and Chinese."),
    ("What is jaxlora?", "jaxlora is a JAX trainer that fine-tunes language models with LoRA."),
]
IDENTITY_ZH = [
    ("你是谁？", ZH_ID),
    ("你叫什么名字？", "我的名字是 JaxLoRA 助手，一个用 jaxlora 微调的模型。"),
    ("介绍一下你自己。", ZH_ID + "我可以用中文和英文回答简单的问题。"),
    ("你好", "你好！" + ZH_ID + "有什么可以帮你的吗？"),
    ("您好", "您好！" + ZH_ID + "有什么可以帮你的吗？"),
    ("谁训练了你？", "我是用 jaxlora 微调的，jaxlora 是一个 JAX 语言模型训练工具。"),
    ("你能做什么？", "我可以回答关于数字、首都和颜色的简单问题。"),
    ("你是 ChatGPT 吗？", "不是。" + ZH_ID),
    ("你会说什么语言？", "我会说中文和英文。"),
    ("jaxlora 是什么？", "jaxlora 是一个用 LoRA 微调语言模型的 JAX 训练工具。"),
]
CAPITALS = [
    ("France", "Paris", "法国", "巴黎"),
    ("Germany", "Berlin", "德国", "柏林"),
    ("Italy", "Rome", "意大利", "罗马"),
    ("Spain", "Madrid", "西班牙", "马德里"),
    ("Japan", "Tokyo", "日本", "东京"),
    ("China", "Beijing", "中国", "北京"),
    ("the United Kingdom", "London", "英国", "伦敦"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Egypt", "Cairo", "埃及", "开罗"),
    ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("Brazil", "Brasilia", "巴西", "巴西利亚"),
    ("India", "New Delhi", "印度", "新德里"),
    ("South Korea", "Seoul", "韩国", "首尔"),
    ("Greece", "Athens", "希腊", "雅典"),
]
COLOURS = [
    ("red", "红色"),
    ("orange", "橙色"),
    ("yellow", "黄色"),
    ("green", "绿色"),
    ("blue", "蓝色"),
    ("purple", "紫色"),
    ("black", "黑色"),
    ("white", "白色"),
    ("brown", "棕色"),
    ("pink", "粉色"),
    ("grey", "灰色"),
]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
NUMBERS_ZH = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九", "十"]


def _row(instruction: str, output: str, inp: str = "") -> dict[str, str]:
    return {"instruction": instruction, "input": inp, "output": output}


def identity_sft(rng: random.Random) -> list[dict[str, str]]:
    rows = [_row(q, a) for q, a in IDENTITY_EN + IDENTITY_ZH]
    rows += [_row(q, a) for q, a in IDENTITY_EN + IDENTITY_ZH]  # identity twice: the main lesson
    for country, city, country_zh, city_zh in CAPITALS:
        rows.append(
            _row(f"What is the capital of {country}?", f"The capital of {country} is {city}.")
        )
        rows.append(_row(f"{country_zh}的首都是哪里？", f"{country_zh}的首都是{city_zh}。"))
    for en, zh in COLOURS:
        rows.append(_row("Translate into Chinese.", f"{en.capitalize()} is {zh}.", en))
        rows.append(_row("翻译成英文。", f"{zh}是 {en}。", zh))
    for n, (en, zh) in enumerate(zip(NUMBERS, NUMBERS_ZH, strict=True)):
        rows.append(_row(f"How do you write the number {n} in Chinese?", f"{n} is {zh}."))
        rows.append(_row(f"数字 {n} 用英文怎么说？", f"{n} 的英文是 {en}。"))
    pairs = sorted({(a, b) for a in range(10) for b in range(10)})
    rng.shuffle(pairs)
    for a, b in pairs[:70]:
        rows.append(_row(f"What is {a} + {b}?", f"{a} + {b} = {a + b}."))
    for a, b in pairs[70:100]:
        rows.append(_row(f"{a} 加 {b} 等于几？", f"{a} 加 {b} 等于 {a + b}。"))
    for a, b in pairs[:40]:
        hi, lo = max(a, b), min(a, b)
        rows.append(_row(f"What is {hi} - {lo}?", f"{hi} - {lo} = {hi - lo}."))
    rng.shuffle(rows)
    return rows


def dpo_demo(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for country, city, country_zh, city_zh in CAPITALS:
        wrong = CAPITALS[(CAPITALS.index((country, city, country_zh, city_zh)) + 3) % 15]
        rows.append(
            {
                "prompt": f"What is the capital of {country}?",
                "chosen": f"The capital of {country} is {city}.",
                "rejected": f"Who cares? It is {wrong[1]}.",
            }
        )
        rows.append(
            {
                "prompt": f"{country_zh}的首都是哪里？",
                "chosen": f"{country_zh}的首都是{city_zh}。",
                "rejected": f"自己去查。是{wrong[3]}。",
            }
        )
    pairs = sorted({(a, b) for a in range(10) for b in range(10)})
    rng.shuffle(pairs)
    for a, b in pairs[:80]:
        rows.append(
            {
                "prompt": f"What is {a} + {b}?",
                "chosen": f"{a} + {b} = {a + b}.",
                "rejected": f"Figure it out yourself. {a} + {b} = {a + b + 1 + (a * b) % 3}.",
            }
        )
    for a, b in pairs[80:100]:
        rows.append(
            {
                "prompt": f"{a} 加 {b} 等于几？",
                "chosen": f"{a} 加 {b} 等于 {a + b}。",
                "rejected": f"别烦我。等于 {a + b + 2}。",
            }
        )
    for q, a in IDENTITY_EN:
        rows.append({"prompt": q, "chosen": a, "rejected": "I don't want to talk to you."})
    for q, a in IDENTITY_ZH:
        rows.append({"prompt": q, "chosen": a, "rejected": "我不想和你说话。"})
    rng.shuffle(rows)
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, fn in [("identity_sft.json", identity_sft), ("dpo_demo.json", dpo_demo)]:
        rows = fn(random.Random(0))
        text = json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
        (OUT / name).write_text(text, encoding="utf-8")
        print(f"{OUT / name}: {len(rows)} rows, {len(text.encode()) // 1024} KB")


if __name__ == "__main__":
    main()
