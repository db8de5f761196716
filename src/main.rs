//! `gateway`: see `cli` for the commands.

// glibc's allocator was a third of the request path's instructions (callgrind);
// mimalloc is the usual choice for allocation-heavy servers. Built with `no_thp`:
// with transparent huge pages its eagerly committed arena made ~10 MiB of the
// idle process resident (2 MiB pages for a heap of a few MiB).
use std::alloc::{GlobalAlloc, Layout};

#[global_allocator]
static GLOBAL: Mimalloc = Mimalloc;

/// `mimalloc::MiMalloc`, except that an allocation whose alignment every
/// mimalloc block of its size already has (at most 16 bytes and at most the
/// size, the rule `std`'s `System` allocator uses for `malloc`) goes to the
/// plain `mi_malloc`/`mi_realloc`: `MiMalloc` calls the aligned entry points
/// for all, ~15 instructions more each, ~200 allocations per webhook (issue 18).
/// mimalloc rounds every block above 8 bytes to a multiple of 16 and starts
/// every page's blocks 16-byte aligned (`MI_ALIGN2W`, `MI_MAX_ALIGN_SIZE`).
struct Mimalloc;

/// What `mi_malloc` guarantees: `MI_MAX_ALIGN_SIZE`, as for C's `malloc`.
const MI_MIN_ALIGN: usize = 16;

fn plain(align: usize, size: usize) -> bool {
    align <= MI_MIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` takes
// blocks from both the plain and the aligned entry points); the plain ones are
// used only where their alignment is guaranteed (see above).
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            // SAFETY: a non-zero size (align >= 1 and align <= size)
            unsafe { libmimalloc_sys::mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: as the caller promised for `layout`
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            // SAFETY: a non-zero size
            unsafe { libmimalloc_sys::mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: as the caller promised for `layout`
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (mimalloc)
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            // SAFETY: `ptr` came from mimalloc; a non-zero new size
            unsafe { libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            // SAFETY: as the caller promised
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
        }
    }
}

fn main() -> std::process::ExitCode {
    cognigy_gateway::cli::run()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layout gets a block of its alignment, zeroed when asked, and a
    /// reallocation (larger, then back) keeps the bytes, on both paths.
    #[test]
    fn blocks_are_aligned_and_reallocations_keep_their_bytes() {
        let a = Mimalloc;
        for align in [1usize, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1usize, 3, 8, 16, 24, 48, 100, 1000, 5000, 70_000] {
                let layout = Layout::from_size_align(size.next_multiple_of(align), align).unwrap();
                let (len, larger) = (
                    layout.size(),
                    (2 * layout.size() + align).next_multiple_of(align),
                );
                let is_aligned = |p: *mut u8| !p.is_null() && (p as usize).is_multiple_of(align);
                // SAFETY: non-zero sizes; every block is freed once, with its layout
                unsafe {
                    let z = a.alloc_zeroed(layout);
                    assert!(is_aligned(z), "{layout:?}");
                    assert!((0..len).all(|i| *z.add(i) == 0), "{layout:?}");
                    a.dealloc(z, layout);

                    let p = a.alloc(layout);
                    assert!(is_aligned(p), "{layout:?}");
                    p.write_bytes(0xa5, len);
                    let q = a.realloc(p, layout, larger);
                    assert!(is_aligned(q), "{layout:?} -> {larger}");
                    assert!(
                        (0..len).all(|i| *q.add(i) == 0xa5),
                        "{layout:?} -> {larger}"
                    );
                    let r = a.realloc(q, Layout::from_size_align(larger, align).unwrap(), len);
                    assert!(is_aligned(r), "{layout:?} back");
                    assert!((0..len).all(|i| *r.add(i) == 0xa5), "{layout:?} back");
                    a.dealloc(r, layout);
                }
            }
        }
    }
}
