//! `other-world`: a real component of a world that is not procd's (it exports one `run` function and
//! nothing procd needs), so a deploy must refuse it.

// The generated bindings and their export glue are `unsafe` canonical-ABI code.
#![allow(unsafe_code)]

wit_bindgen::generate!({
    inline: r"
        package test:other@0.1.0;

        world other {
            export run: func(x: u32) -> u32;
        }
    ",
    world: "other",
});

struct Other;

impl Guest for Other {
    fn run(x: u32) -> u32 {
        x.wrapping_add(1)
    }
}

export!(Other);
