"""qkv.serve.html_text: the text of a page out, its translations back in, the markup untouched."""

from qkv.serve.html_text import join_html, split_html, text_nodes


def test_text_nodes_come_out_unescaped_and_go_back_escaped():
    page = (
        '<div title="a &amp; b">Tom &amp; Jerry<br>  <em>x &lt; y</em>\n</div><style>p {}</style>'
    )
    parts = split_html(page)
    assert text_nodes(parts) == ["Tom & Jerry", "x < y"]
    assert join_html(parts, ["Tom & Jerry", "x < y"]) == page  # identity: the page comes back
    assert join_html(parts, ["A & B", "<C>"]) == page.replace(
        "Tom &amp; Jerry", "A &amp; B"
    ).replace("x &lt; y", "&lt;C&gt;")


def test_comments_scripts_and_declarations_are_markup():
    page = "<!DOCTYPE html><!-- note --><script>if (a < b) {}</script><p>hello</p>"
    parts = split_html(page)
    assert text_nodes(parts) == ["hello"]
    assert join_html(parts, ["HELLO"]) == page.replace("hello", "HELLO")
