"""qkv.serve.html_text: the text of a page out, its translations back in, the markup untouched."""

from hypothesis import given
from hypothesis import strategies as st

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


def test_a_bare_less_than_sign_is_text_and_markup_comes_back_as_it_was():
    page = "<P>5 < 6 is true</P>\r\n<svg><![CDATA[ x < y ]]></svg>\n<B >a\rb</B >"
    parts = split_html(page)
    assert text_nodes(parts) == ["5 < 6 is true", "a\rb"]  # one sentence, not "5", "<", "6 is true"
    assert join_html(parts, ["X", "Y"]) == "<P>X</P>\r\n<svg><![CDATA[ x < y ]]></svg>\n<B >Y</B >"


TAGS = [
    "<p>",
    "</P>",
    "<br/>",
    "<!-- c -->",
    "<![CDATA[ a < b ]]>",
    '<a href="x">',
    "<!DOCTYPE html>",
]


@given(
    st.lists(
        st.one_of(
            st.sampled_from(TAGS),
            st.text(alphabet=st.characters(blacklist_characters="<>&", codec="utf-8"), max_size=12),
        ),
        max_size=12,
    )
)
def test_a_page_of_tags_and_text_comes_back_character_for_character(pieces):
    page = "".join(pieces)
    parts = split_html(page)
    assert "".join(content for _, content in parts) == page
    assert join_html(parts, text_nodes(parts)) == page
