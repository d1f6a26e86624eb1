# platform.mk: the microvm target, included by unikernel/Makefile.
#
# Expects UNIKERNEL_DIR (path of unikernel/) and BUILD_DIR (unikernel/build).
# Provides:
#   MICROVM_CFLAGS   flags for EVERY object linked into a microvm image
#                    (core and apps too): freestanding, no red zone (the
#                    trap handler runs on the interrupted stack), non-PIC,
#                    small code model (linked at 1 MiB), our libc headers
#                    only (-nostdinc: glibc's headers must not leak in).
#   MICROVM_LDFLAGS  link flags (linker script, no libc, static).
#   MICROVM_LDLIBS   put last on the link line (libgcc helpers).
#   MICROVM_OBJS     the platform's objects, built below into
#                    $(BUILD_DIR)/microvm/platform/.
#   MICROVM_LDSCRIPT the linker script (a prerequisite of the image).
# Link an image with:
#   $(CC) $(MICROVM_LDFLAGS) -o app.elf <core+app objs> $(MICROVM_OBJS) $(MICROVM_LDLIBS)

MICROVM_DIR      := $(UNIKERNEL_DIR)/platform/microvm
MICROVM_BUILD    := $(BUILD_DIR)/microvm/platform
MICROVM_LDSCRIPT := $(MICROVM_DIR)/link.ld

MICROVM_CFLAGS := -std=c11 -O2 -g -m64 -march=x86-64 -mno-red-zone \
	-mcmodel=small -fno-pic -fno-pie -ffreestanding -fno-stack-protector \
	-fno-asynchronous-unwind-tables -fno-unwind-tables \
	-ffunction-sections -fdata-sections \
	-nostdinc -isystem $(shell $(CC) -print-file-name=include) \
	-I$(MICROVM_DIR)/include -I$(UNIKERNEL_DIR)/platform

MICROVM_LDFLAGS := -nostdlib -static -no-pie -Wl,-T,$(MICROVM_LDSCRIPT) \
	-Wl,--gc-sections -Wl,--build-id=none -Wl,-z,max-page-size=0x1000 \
	-Wl,-z,noexecstack
MICROVM_LDLIBS := $(shell $(CC) -print-libgcc-file-name)

MICROVM_C_SRCS := pvh.c serial.c trap.c irq.c clock.c alloc.c libc.c exit.c \
	virtqueue.c virtio_mmio.c virtio_console.c
MICROVM_S_SRCS := boot.S isr.S

MICROVM_C_OBJS := $(addprefix $(MICROVM_BUILD)/,$(MICROVM_C_SRCS:.c=.o))
MICROVM_S_OBJS := $(addprefix $(MICROVM_BUILD)/,$(MICROVM_S_SRCS:.S=.o))
MICROVM_OBJS   := $(MICROVM_S_OBJS) $(MICROVM_C_OBJS)

# Our own sources are held to the strictest warnings; -MMD tracks headers.
MICROVM_WARN := -Wall -Wextra -Werror

$(MICROVM_C_OBJS): $(MICROVM_BUILD)/%.o: $(MICROVM_DIR)/%.c $(MICROVM_DIR)/platform.mk
	@mkdir -p $(@D)
	$(CC) $(MICROVM_CFLAGS) $(MICROVM_WARN) -I$(MICROVM_DIR) -MMD -MP -c -o $@ $<

$(MICROVM_S_OBJS): $(MICROVM_BUILD)/%.o: $(MICROVM_DIR)/%.S $(MICROVM_DIR)/platform.mk
	@mkdir -p $(@D)
	$(CC) $(MICROVM_CFLAGS) $(MICROVM_WARN) -MMD -MP -c -o $@ $<

-include $(MICROVM_OBJS:.o=.d)
