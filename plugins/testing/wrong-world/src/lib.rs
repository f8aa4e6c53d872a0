//! `wrong-world` (test plugin): a valid component of some other world, with
//! none of the consumer world's exports. The broker must refuse to deploy it.

wit_bindgen::generate!({
    inline: "
        package test:other;
        world other {
            export run: func() -> u32;
        }
    ",
});

struct Other;

impl Guest for Other {
    fn run() -> u32 {
        42
    }
}

export!(Other);
